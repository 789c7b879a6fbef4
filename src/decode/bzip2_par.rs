//! bzip2 on all cores, for the files parallel compressors write.
//!
//! bzip2 is by far our slowest decoder (about 20 MB/s of output per core, five times slower
//! than gzip), and the archives operators build with `pbzip2` are a concatenation of
//! independent bzip2 *streams*, one per 900 kB of input. Those can be decoded side by side.
//! This reader does that and hands the output back in order, through the same synchronous
//! `Read` the tar parser pulls from.
//!
//! ## Shape
//!
//! Two phases, and the reader moves between them at stream boundaries:
//!
//! - **Sequential**: the existing decoder (`Members`) on the caller's thread. Every file
//!   starts here, so a single-stream file (`bzip2`, `lbzip2`: one stream of many blocks)
//!   streams exactly as before: first bytes out after its first block, nothing buffered,
//!   no thread started. When a stream ends, the parallel phase takes over from there.
//! - **Parallel**: the caller's thread reads ahead in `READ_CHUNK`s and looks for
//!   byte-aligned *candidate* stream starts: `BZh`, a level digit and the first block's
//!   magic `1AY&SY` (ten bytes). It cuts the input at candidates into segments (each at
//!   least `MIN_SEGMENT` long, so runs of tiny streams travel together) and gives each to
//!   one of a few worker threads, which decodes it as a sequence of *whole* streams that
//!   must end exactly at the segment's end. Output comes back in `OUTPUT_CHUNK`s through
//!   a bounded channel per segment, and the reader returns it strictly in segment order.
//!   At most `max_in_flight` segments are cut ahead, so read-ahead stays at a few MB, and
//!   a decompression bomb (bzip2's run-length stage expands a 900 kB block to ~45 MB) fills
//!   only `OUTPUT_DEPTH` chunks before its worker waits for the reader.
//!
//! The parallel phase hands back to the sequential one when a segment fails (below), when
//! `MAX_SEGMENT` bytes are pending without a candidate (a stream of many blocks: it is
//! not buffered whole), and on an input error (network, disk), which then surfaces at the
//! same offset as it would have.
//!
//! The brief was to start in the parallel phase and stay sequential after any hand-over.
//! Measured on tests/it/setup_fetch.rs's throttled 2 MB single-stream `bzip2 -1` archive,
//! that put the first file on disk after 1,083,630 of 2,114,415 bytes had been sent
//! (26 kB for the other formats): the 1 MiB of read-ahead before giving up on finding a
//! second stream. Starting sequential costs pbzip2 files only their first stream on one
//! core, and moving back to the parallel phase at the next stream boundary keeps one false
//! candidate or one big stream from making the rest of the file sequential.
//!
//! ## Why the output is the sequential decoder's, byte for byte and error for error
//!
//! Induction over segments: if segment *i* starts at a true stream boundary (the first
//! does: the sequential phase hands over only between members) and a worker decodes it
//! as whole streams ending exactly at its end c(i+1), then the sequential decoder would be
//! at c(i+1), between members, having produced the same bytes (a bzip2 stream decodes
//! alone: its output depends only on its own bytes), and would start a member there, since
//! c(i+1) carries the magic. So segment *i + 1* starts at a true boundary too. The last
//! segment must end exactly at end-of-file; a clean end there is what the sequential
//! decoder would also see.
//!
//! A candidate can be false (the ten bytes occurring by chance inside compressed data, or
//! on purpose in hostile input); then some segment does not decode as whole streams. Any
//! failure of a segment, whatever its cause (a false cut, corruption, truncation, zero
//! padding or garbage after the last stream), hands everything from that segment's start
//! on to the sequential decoder, resumed with the member count and compressed offset it
//! would have had there (`Members::resume`), over the bytes still held (that segment,
//! the later ones, the uncut rest) followed by the rest of the input. The output bytes of
//! the failed segment the caller already has are decoded again and skipped: a decoder's
//! output is a function of its input prefix, so what the worker emitted is what the
//! sequential decoder emits, as far as either gets. So a bad file fails with exactly the sequential decoder's
//! error, and its padding and garbage rules apply unchanged. (libbz2 checks a block's CRC
//! after handing out the block's bytes, so before a CRC error both readers return part of
//! the bad block, as much as their reads happened to take. The offset in a corrupt-data
//! message is libbz2-rs's count of bytes taken in, which can differ by up to the 8 bytes it
//! reads ahead when the input is buffered differently; so it does between two runs of the
//! sequential decoder on a network stream.)
//!
//! After a hand-over the sequential phase runs at least to the end of the failed segment
//! (`sequential_until`), so however hostile the input, no byte is decoded more than about
//! twice and a false candidate costs speed, never correctness.
//!
//! ## Threads
//!
//! None with one CPU ([`default_workers`]) or `DecodeOptions::bzip2_workers` ≤ 1
//! (`decoder_with` does not build this reader then). Otherwise up to [`MAX_WORKERS`],
//! started with the first segment and joined when the reader is dropped. Dropping the
//! reader early (an extraction error, a cancelled setup) cancels the segments in flight and
//! joins the workers; a worker notices within one call into the decoder (`FEED` bytes of
//! input or one output chunk).
//!
//! Block-level parallelism inside one stream (what `lbzip2 -d` does for single-stream
//! files) would need a bzip2 block decoder of our own; not done.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::{DecodeOptions, Format, Members};

/// Most worker threads one decoder starts. Each holds a bzip2 decoder (3.6 MB for `-9`
/// blocks) and up to `OUTPUT_DEPTH` + 1 output chunks; four keep a decoder well inside
/// the 64 MiB RSS target of `vrun setup`, and past four the caller's thread (tar parsing,
/// writing) becomes the bottleneck anyway.
pub const MAX_WORKERS: u32 = 4;

/// Workers to use by default: the CPUs available to this process, at most
/// [`MAX_WORKERS`]. 1 (decode on the caller's thread) when that cannot be determined.
pub fn default_workers() -> u32 {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() as u32)
        .min(MAX_WORKERS)
}

/// Segments cut ahead of the one being returned: enough that every worker has one to
/// decode while the reader drains another, plus one being queued; with `MAX_SEGMENT` this
/// bounds the compressed read-ahead at a few MB.
fn max_in_flight(workers: usize) -> usize {
    2 * workers + 1
}

/// Input asked of the inner reader per call.
const READ_CHUNK: usize = 256 * 1024;

/// A segment is cut only at a candidate at least this far from its start, so runs of tiny
/// streams go to one worker together (each segment costs a channel, a thread hop and a
/// fresh 3.6 MB decoder state). pbzip2 -9's streams, 900 kB of input each, are mostly
/// larger (30–905 kB on the bench corpus).
const MIN_SEGMENT: usize = 64 * 1024;

/// Pending input without a further candidate after which the reader hands over to the
/// sequential decoder: a stream of many blocks must not be buffered whole. Above pbzip2
/// -9's largest streams (~905 kB, incompressible data), so those stay parallel.
const MAX_SEGMENT: usize = 1024 * 1024;

/// Output handed back per message. A pbzip2 -9 segment yields ~900 kB, so a worker can
/// finish a whole segment into its channel while the reader drains the previous one
/// (which is what keeps both cores busy), yet a bomb is held back after 1.5 MiB.
const OUTPUT_CHUNK: usize = 512 * 1024;

/// Output chunks a worker may queue per segment before it waits for the reader.
const OUTPUT_DEPTH: usize = 2;

/// Input given to one decoder call: how often a worker looks at the stop flag while it
/// reads a block (about 3 ms of work).
const FEED: usize = 64 * 1024;

/// `BZh`, level, and the first block's magic: what a stream with at least one block starts
/// with. (An empty stream has no block; it never starts a segment, but may sit inside one.)
const STREAM_START_LEN: usize = 10;
const BLOCK_MAGIC: [u8; 6] = [0x31, 0x41, 0x59, 0x26, 0x53, 0x59];

fn is_stream_start(b: &[u8]) -> bool {
    b.len() >= STREAM_START_LEN
        && b.starts_with(b"BZh")
        && (b'1'..=b'9').contains(&b[3])
        && b[4..10] == BLOCK_MAGIC
}

/// Where segments may be cut: the first candidate at or after `from` that lies wholly in
/// `buf`. A function pointer so tests can add false candidates.
type FindCut = fn(&[u8], usize) -> Option<usize>;

/// The first candidate stream start at or after `from` that lies wholly in `buf`.
fn find_stream_start(buf: &[u8], from: usize) -> Option<usize> {
    let last = buf.len().checked_sub(STREAM_START_LEN)?;
    let mut i = from;
    while i <= last {
        i += buf[i..=last].iter().position(|&b| b == b'B')?;
        if is_stream_start(&buf[i..]) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Decode `seg` as a sequence of whole bzip2 streams ending exactly at its end, giving the
/// output to `emit` in chunks of at most [`OUTPUT_CHUNK`] bytes. Returns the number of
/// streams, or `None` when `seg` is not such a sequence (truncated, corrupt, followed by
/// anything, starting elsewhere than at a stream), when `emit` returns false, or when
/// `stop` is set.
fn decode_segment(
    seg: &[u8],
    stop: &AtomicBool,
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> Option<u64> {
    let mut pos = 0;
    let mut streams = 0;
    let mut chunk = Vec::with_capacity(OUTPUT_CHUNK);
    while pos < seg.len() {
        if !Format::Bzip2.member_magic(&seg[pos..]) {
            return None;
        }
        let mut d = bzip2::Decompress::new(false);
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            if chunk.len() == chunk.capacity() {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(OUTPUT_CHUNK));
                if !emit(full) {
                    return None;
                }
            }
            let input = &seg[pos..seg.len().min(pos + FEED)];
            let (in_before, out_before) = (d.total_in(), d.total_out());
            let status = d.decompress_vec(input, &mut chunk).ok()?;
            let consumed = (d.total_in() - in_before) as usize;
            let produced = d.total_out() - out_before;
            pos += consumed;
            match status {
                bzip2::Status::StreamEnd => break,
                bzip2::Status::Ok if consumed > 0 || produced > 0 => {}
                // No progress with room for output: the segment ends inside the stream.
                _ => return None,
            }
        }
        streams += 1;
    }
    if !chunk.is_empty() && !emit(chunk) {
        return None;
    }
    Some(streams)
}

/// A worker's word on its segment, in order: `Data`*, then `Done` or `Failed`.
enum Output {
    Data(Vec<u8>),
    /// The segment was this many whole streams, ending exactly at its end.
    Done {
        streams: u64,
    },
    /// It was not; the reader hands over to the sequential decoder.
    Failed,
}

struct Job {
    bytes: Arc<[u8]>,
    out: Sender<Output>,
    /// Set when the reader no longer wants this segment.
    cancel: Arc<AtomicBool>,
}

fn work(jobs: Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        if job.cancel.load(Ordering::Relaxed) {
            continue;
        }
        // A panic on hostile input must not leave the reader waiting for this segment;
        // the sequential decoder then meets the same input on the caller's thread.
        let result = catch_unwind(AssertUnwindSafe(|| {
            decode_segment(&job.bytes, &job.cancel, |chunk| {
                job.out.send(Output::Data(chunk)).is_ok()
            })
        }));
        let verdict = match result {
            Ok(Some(streams)) => Output::Done { streams },
            _ => Output::Failed,
        };
        let _ = job.out.send(verdict);
    }
}

/// The worker threads of one decoder, started with the first segment (a single-stream
/// file never starts any) and kept across hand-overs. Dropping it joins them.
struct Pool {
    jobs: Option<Sender<Job>>,
    jobs_rx: Receiver<Job>,
    threads: Vec<JoinHandle<()>>,
    workers: usize,
}

impl Pool {
    fn new(workers: usize) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Pool {
            jobs: Some(tx),
            jobs_rx: rx,
            threads: Vec::new(),
            workers,
        }
    }

    /// Queue `bytes` for a worker; its output arrives on the returned receiver. If no
    /// thread can be started, the receiver reports a disconnect, which the reader treats
    /// like a failed segment.
    fn submit(&mut self, bytes: Arc<[u8]>, cancel: Arc<AtomicBool>) -> Receiver<Output> {
        if self.threads.len() < self.workers {
            let jobs = self.jobs_rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vrun-bunzip2-{}", self.threads.len()))
                .spawn(move || work(jobs));
            if let Ok(handle) = spawned {
                self.threads.push(handle);
            }
        }
        let (tx, rx) = crossbeam_channel::bounded(OUTPUT_DEPTH);
        if let (false, Some(jobs)) = (self.threads.is_empty(), &self.jobs) {
            let _ = jobs.send(Job {
                bytes,
                out: tx,
                cancel,
            });
        }
        rx
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        // Queued jobs hold output senders; dropping them lets nothing wait on them.
        while self.jobs_rx.try_recv().is_ok() {}
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A segment given to a worker, kept until its output has been returned in full.
/// Dropping it tells the worker to stop.
struct Segment {
    /// Kept for a hand-over to the sequential decoder.
    bytes: Arc<[u8]>,
    /// Compressed offset of its first byte.
    offset: u64,
    out: Receiver<Output>,
    cancel: Arc<AtomicBool>,
    /// Output bytes of this segment already returned to the caller.
    delivered: u64,
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// The input as both phases read it: bytes already read from the inner reader but handed
/// back by the phase before, then an error that phase met reading ahead (so it surfaces at
/// the same offset), then the rest of the inner reader.
struct Source<R> {
    held: Vec<u8>,
    pos: usize,
    error: Option<io::Error>,
    inner: R,
}

impl<R: Read> Source<R> {
    /// `held` + `self`'s own unread held bytes, then its error (or `error`), then its reader.
    fn behind(mut self, mut held: Vec<u8>, error: Option<io::Error>) -> Self {
        held.extend_from_slice(&self.held[self.pos..]);
        Source {
            held,
            pos: 0,
            error: error.or(self.error.take()),
            inner: self.inner,
        }
    }
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.held.len() {
            let n = buf.len().min(self.held.len() - self.pos);
            buf[..n].copy_from_slice(&self.held[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.held.len() {
                self.held = Vec::new();
                self.pos = 0;
            }
            return Ok(n);
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => self.inner.read(buf),
        }
    }
}

/// The parallel phase: segments in flight and the input not yet cut.
struct Parallel<R> {
    segments: VecDeque<Segment>,
    /// The output chunk being returned (of the first segment) and how much of it has been.
    chunk: Vec<u8>,
    chunk_pos: usize,
    source: Source<R>,
    eof: bool,
    read_error: Option<io::Error>,
    /// Input read but not yet cut; starts at a stream boundary if the segments before
    /// it decode.
    pending: Vec<u8>,
    pending_offset: u64,
    /// What the source reads into (a copy into `pending` is cheaper than zeroing
    /// `pending`'s spare room for every read, as reads are often small).
    scratch: Box<[u8]>,
    /// Candidates before this index of `pending` have been looked for.
    scanned: usize,
    /// Whole streams returned before the first segment in flight (or before `pending`).
    members: u64,
    /// Segments the workers decoded.
    decoded: u64,
}

enum Step {
    Data(usize),
    End,
    HandOver,
}

impl<R: Read> Parallel<R> {
    /// Start at a stream boundary: `members` whole streams end at compressed `offset`,
    /// where `source` continues.
    fn new(source: Source<R>, members: u64, offset: u64) -> Self {
        Parallel {
            segments: VecDeque::new(),
            chunk: Vec::new(),
            chunk_pos: 0,
            source,
            eof: false,
            read_error: None,
            pending: Vec::new(),
            pending_offset: offset,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            scanned: 0,
            members,
            decoded: 0,
        }
    }

    /// Return output of the first segment, cutting and reading ahead as there is room;
    /// or say the input ended cleanly, or that the sequential decoder must take over.
    fn step(&mut self, pool: &mut Pool, find_cut: FindCut, out: &mut [u8]) -> Step {
        let max_in_flight = max_in_flight(pool.workers);
        loop {
            if self.chunk_pos < self.chunk.len() {
                let n = out.len().min(self.chunk.len() - self.chunk_pos);
                out[..n].copy_from_slice(&self.chunk[self.chunk_pos..self.chunk_pos + n]);
                self.chunk_pos += n;
                if let Some(head) = self.segments.front_mut() {
                    head.delivered += n as u64;
                }
                return Step::Data(n);
            }
            if let Some(head) = self.segments.front() {
                match head.out.try_recv() {
                    Ok(output) => {
                        if self.take(output) {
                            continue;
                        }
                        return Step::HandOver;
                    }
                    Err(TryRecvError::Disconnected) => return Step::HandOver,
                    Err(TryRecvError::Empty) => {}
                }
            }
            if self.segments.len() < max_in_flight {
                self.cut(pool, find_cut, max_in_flight);
            }
            let room = self.segments.len() < max_in_flight;
            if room && !self.eof && self.pending.len() < MAX_SEGMENT {
                if !self.fill() {
                    return Step::HandOver;
                }
                continue;
            }
            if room && self.eof && !self.pending.is_empty() {
                let last = std::mem::take(&mut self.pending);
                self.submit(pool, last);
                continue;
            }
            if let Some(head) = self.segments.front() {
                match head.out.recv() {
                    Ok(output) => {
                        if self.take(output) {
                            continue;
                        }
                        return Step::HandOver;
                    }
                    Err(_) => return Step::HandOver,
                }
            }
            // Nothing in flight: either all of the input decoded as whole streams, or
            // `pending` grew too big without a candidate (a stream of many blocks).
            if self.eof && self.pending.is_empty() && self.members > 0 {
                return Step::End;
            }
            return Step::HandOver;
        }
    }

    /// Act on a message of the first segment; false if it failed.
    fn take(&mut self, output: Output) -> bool {
        match output {
            Output::Data(chunk) => {
                self.chunk = chunk;
                self.chunk_pos = 0;
                true
            }
            Output::Done { streams } => {
                self.members += streams;
                self.decoded += 1;
                self.segments.pop_front();
                true
            }
            Output::Failed => false,
        }
    }

    /// Read once from the source into `pending`; false on an error (kept for the
    /// hand-over).
    fn fill(&mut self) -> bool {
        match self.source.read(&mut self.scratch) {
            Ok(0) => self.eof = true,
            Ok(n) => self.pending.extend_from_slice(&self.scratch[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                self.read_error = Some(e);
                return false;
            }
        }
        true
    }

    /// Cut segments off `pending` at candidates while there is room in flight.
    fn cut(&mut self, pool: &mut Pool, find_cut: FindCut, max_in_flight: usize) {
        while self.segments.len() < max_in_flight {
            let from = self.scanned.max(MIN_SEGMENT);
            match find_cut(&self.pending, from) {
                Some(at) => {
                    let rest = self.pending.split_off(at);
                    let segment = std::mem::replace(&mut self.pending, rest);
                    self.submit(pool, segment);
                    self.scanned = 0;
                }
                None => {
                    let unsure = self.pending.len().saturating_sub(STREAM_START_LEN - 1);
                    self.scanned = from.max(unsure);
                    return;
                }
            }
        }
    }

    /// Give the bytes at `pending_offset` to a worker.
    fn submit(&mut self, pool: &mut Pool, bytes: Vec<u8>) {
        let bytes: Arc<[u8]> = bytes.into();
        let offset = self.pending_offset;
        self.pending_offset += bytes.len() as u64;
        let cancel = Arc::new(AtomicBool::new(false));
        let out = pool.submit(bytes.clone(), cancel.clone());
        self.segments.push_back(Segment {
            bytes,
            offset,
            out,
            cancel,
            delivered: 0,
        });
    }

    /// Cancel the segments in flight and build the sequential decoder for everything from
    /// the first one not yet returned in full; also returns how many of its output bytes
    /// the caller already has, and where that segment (or the pending input) ends.
    fn hand_over(self, options: DecodeOptions) -> (Members<Source<R>>, u64, u64) {
        let Parallel {
            segments,
            source,
            read_error,
            pending,
            pending_offset,
            members,
            ..
        } = self;
        let (offset, skip, end) = segments.front().map_or(
            (pending_offset, 0, pending_offset + pending.len() as u64),
            |s| (s.offset, s.delivered, s.offset + s.bytes.len() as u64),
        );
        let held = segments.iter().map(|s| s.bytes.len()).sum::<usize>() + pending.len();
        let mut bytes = Vec::with_capacity(held);
        for s in &segments {
            bytes.extend_from_slice(&s.bytes);
        }
        bytes.extend_from_slice(&pending);
        drop(segments);
        let source = source.behind(bytes, read_error);
        let members = Members::resume(Format::Bzip2, options, source, members, offset);
        (members, skip, end)
    }
}

enum Mode<R: Read> {
    Parallel(Box<Parallel<R>>),
    Sequential {
        members: Box<Members<Source<R>>>,
        /// Output bytes to drop: the caller has them from a worker already.
        skip: u64,
    },
    /// Only while switching.
    Switching,
}

/// The parallel bzip2 decoder (see the module note). Built by `decoder_with` when
/// `bzip2_workers` > 1.
pub(super) struct ParallelBzip2<R: Read> {
    /// Declared before `pool`: segments are cancelled before the workers are joined.
    mode: Mode<R>,
    pool: Pool,
    options: DecodeOptions,
    find_cut: FindCut,
    /// After a hand-over, the sequential decoder keeps going until this compressed offset
    /// (the end of what the workers failed on), so no byte is decoded more than twice
    /// however hostile the input.
    sequential_until: u64,
    /// Segments the workers decoded, and switches between the phases (for tests).
    decoded: u64,
    to_parallel: u64,
    hand_overs: u64,
}

impl<R: Read> ParallelBzip2<R> {
    pub(super) fn new(inner: R, options: DecodeOptions) -> Self {
        Self::with_cuts(inner, options, find_stream_start)
    }

    fn with_cuts(inner: R, options: DecodeOptions, find_cut: FindCut) -> Self {
        let workers = (options.bzip2_workers.max(1) as usize).min(MAX_WORKERS as usize);
        let source = Source {
            held: Vec::new(),
            pos: 0,
            error: None,
            inner,
        };
        let members = Members::resume(Format::Bzip2, options, source, 0, 0);
        ParallelBzip2 {
            mode: Mode::Sequential {
                members: Box::new(members),
                skip: 0,
            },
            pool: Pool::new(workers),
            options,
            find_cut,
            sequential_until: 0,
            decoded: 0,
            to_parallel: 0,
            hand_overs: 0,
        }
    }
}

#[cfg(test)]
impl<R: Read> ParallelBzip2<R> {
    /// Segments the workers decoded so far.
    fn decoded(&self) -> u64 {
        match &self.mode {
            Mode::Parallel(p) => self.decoded + p.decoded,
            _ => self.decoded,
        }
    }
}

impl<R: Read> Read for ParallelBzip2<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match &mut self.mode {
                Mode::Parallel(p) => {
                    let step = p.step(&mut self.pool, self.find_cut, out);
                    match step {
                        Step::Data(n) => return Ok(n),
                        Step::End => return Ok(0),
                        Step::HandOver => {}
                    }
                }
                Mode::Sequential { members, skip } => {
                    while *skip > 0 {
                        let n = out.len().min(usize::try_from(*skip).unwrap_or(usize::MAX));
                        match members.read(&mut out[..n])? {
                            0 => {
                                return Err(io::Error::other(format!(
                                    "bzip2 decoder ended {skip} bytes short of \
                                     what it returned before (internal error)"
                                )))
                            }
                            got => *skip -= got as u64,
                        }
                    }
                    match members.read_member(out)? {
                        Some(n) => return Ok(n),
                        // A stream ended: let the workers take the next ones, unless we are
                        // still in what they failed on.
                        None if members
                            .boundary_offset()
                            .is_some_and(|at| at >= self.sequential_until) => {}
                        None => continue,
                    }
                }
                Mode::Switching => return Err(io::Error::other("bzip2 stream already failed")),
            }
            self.mode = match std::mem::replace(&mut self.mode, Mode::Switching) {
                Mode::Parallel(p) => {
                    self.decoded += p.decoded;
                    self.hand_overs += 1;
                    let (members, skip, end) = p.hand_over(self.options);
                    self.sequential_until = end;
                    Mode::Sequential {
                        members: Box::new(members),
                        skip,
                    }
                }
                Mode::Sequential { members, skip } => match members.into_boundary() {
                    Ok((held, source, streams, offset)) => {
                        self.to_parallel += 1;
                        let source = source.behind(held, None);
                        Mode::Parallel(Box::new(Parallel::new(source, streams, offset)))
                    }
                    Err(members) => Mode::Sequential { members, skip },
                },
                Mode::Switching => unreachable!("returned above"),
            };
        }
    }
}

#[cfg(test)]
mod tests;
