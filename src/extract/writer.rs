//! Writing regular files: inline on the parse thread, or on writer threads.
//!
//! Regular files are where the bytes and the inode creations are, so they are the only
//! operations handed to writer threads. Everything that changes the *shape* of the tree
//! (directories, symlinks, hard links, replacing an existing name) stays on the parse
//! thread, in archive order, so the in-root resolution there always sees a settled tree.
//!
//! A job carries an open fd of its parent directory (resolved safely by the parse thread)
//! and a bare file name, so a writer never resolves a path. Jobs are in flight between
//! dispatch and completion; the parse thread keys them by (parent inode, name) and, before
//! touching a name that is in flight (a duplicate entry, a hard link to a file still being
//! written), waits for the writers to drain. Duplicates are rare, so a full drain is fine.
//!
//! Memory is bounded by a byte [`Budget`] shared by all queued data: small files travel
//! whole, large ones as a stream of chunks to whichever writer took the job. The parse
//! thread blocks when the budget is spent, which is the back-pressure that keeps memory
//! flat whatever the archive size.
//!
//! Before each chunk of a large file is handed on, the parse thread asks the caller's
//! [`Reserve`] whether the disk can take it (with what is still queued), so the free-space
//! reserve holds *while* a file is written, not only between files.
//!
//! Sparse files are rare and are written on the parse thread: each data segment at its
//! offset (`pwrite`), then the file's length set with `ftruncate`, so holes stay holes.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::tree::{self, Dir, Owner};
use super::{io_error, read_error, ExtractError};
use crate::tar::{Mtime, Segment};

/// Files up to this size are read whole and handed over in one piece.
pub const SMALL_FILE: u64 = 256 * 1024;

/// Chunk size for large files (and the inline copy buffer).
const CHUNK: usize = 256 * 1024;

/// Bytes of file data queued for the writers at most. Enough to keep several writers busy
/// through a run of small files, small enough for the peak-RSS target (64 MiB).
const BUDGET_BYTES: u64 = 16 * 1024 * 1024;

/// Budget charged per job on top of its data, so a flood of empty files is bounded too.
const JOB_OVERHEAD: u64 = 512;

/// Where regular files are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writers {
    /// On the parse thread itself (no overlap; for diagnosis and comparison).
    Inline,
    /// On this many dedicated threads fed by a bounded queue.
    Threads(usize),
}

/// The measured default (see the module note of `extract`).
impl Default for Writers {
    fn default() -> Self {
        Writers::Threads(4)
    }
}

/// Identity of a name in the tree: (inode of the parent directory, file name).
pub type Key = (u64, Box<[u8]>);

/// What a regular file gets besides its bytes.
pub struct FileMeta {
    pub dir: Arc<Dir>,
    pub name: CString,
    pub perm: u32,
    /// `None` when the file is already created with the right owner.
    pub chown: Option<Owner>,
    pub mtime: Mtime,
    /// Bytes of data read from the archive for it.
    pub size: u64,
    /// Extended attributes, set after the owner and mode (chown clears capabilities).
    pub xattrs: Vec<(CString, Vec<u8>)>,
    /// Entry path for error messages.
    pub entry: String,
}

/// Asked before `n` more bytes are handed on for writing, with the bytes still queued
/// for the writers: an error (no space) stops the file.
pub type Reserve<'a> = &'a mut dyn FnMut(u64, u64) -> Result<(), ExtractError>;

enum Data {
    Whole(Vec<u8>),
    Stream(Receiver<Vec<u8>>),
}

struct Job {
    meta: FileMeta,
    key: Key,
    data: Data,
}

struct Done {
    key: Key,
    result: Result<Instant, ExtractError>,
}

/// Counting semaphore of queued bytes. Only the parse thread waits on it, and a release
/// wakes it only when it is waiting (a wake-up is a system call; most releases need none).
struct Budget {
    /// (bytes in use, parse thread waiting)
    state: Mutex<(u64, bool)>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, n: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.0 > 0 && st.0 + n > BUDGET_BYTES {
            st.1 = true;
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.1 = false;
        st.0 += n;
    }

    fn in_use(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn release(&self, n: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 -= n;
        if st.1 {
            self.freed.notify_one();
        }
    }
}

/// The writing side, owned by the parse thread.
pub struct Pool {
    threads: Option<Threads>,
    buf: Vec<u8>,
    pub first_file_done: Option<Instant>,
}

struct Threads {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    handles: Vec<JoinHandle<()>>,
    in_flight: HashSet<Key>,
    budget: Arc<Budget>,
    abort: Arc<AtomicBool>,
    error: Option<ExtractError>,
}

impl Pool {
    pub fn new(writers: Writers) -> io::Result<Pool> {
        let threads = match writers {
            Writers::Inline | Writers::Threads(0) => None,
            Writers::Threads(n) => Some(Threads::spawn(n)?),
        };
        Ok(Pool {
            threads,
            buf: Vec::new(),
            first_file_done: None,
        })
    }

    /// Bytes handed to the writers and not yet written.
    pub fn queued(&self) -> u64 {
        self.threads.as_ref().map_or(0, |t| t.budget.in_use())
    }

    /// Write one regular file whose `meta.size` bytes are read from `data`.
    pub fn file(
        &mut self,
        meta: FileMeta,
        key: Key,
        data: &mut dyn Read,
        reserve: Reserve<'_>,
    ) -> Result<(), ExtractError> {
        let Some(t) = self.threads.as_mut() else {
            if self.buf.len() < CHUNK {
                self.buf = vec![0; CHUNK];
            }
            let done = write_inline(&meta, data, &mut self.buf, reserve)?;
            self.first_file_done.get_or_insert(done);
            return Ok(());
        };
        t.reap(false, &mut self.first_file_done)?;
        let size = meta.size;
        let entry = meta.entry.clone();
        if size <= SMALL_FILE {
            t.budget.acquire(size + JOB_OVERHEAD);
            let mut bytes = Vec::with_capacity(size as usize);
            let read = data.take(size).read_to_end(&mut bytes);
            if let Err(e) = check_read(read.map(|n| n as u64), size, &entry) {
                t.budget.release(size + JOB_OVERHEAD);
                return Err(e);
            }
            t.send(Job {
                meta,
                key,
                data: Data::Whole(bytes),
            });
            return Ok(());
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        t.budget.acquire(JOB_OVERHEAD);
        t.send(Job {
            meta,
            key,
            data: Data::Stream(rx),
        });
        let mut left = size;
        while left > 0 {
            if t.abort.load(Ordering::Relaxed) {
                break;
            }
            let n = left.min(CHUNK as u64);
            // On an error the writer sees the stream end early and drops the job.
            reserve(n, t.budget.in_use())?;
            t.budget.acquire(n);
            let mut chunk = vec![0; n as usize];
            if let Err(e) = data.read_exact(&mut chunk) {
                t.budget.release(n);
                return Err(read_error(e, &entry));
            }
            left -= n;
            if tx.send(chunk).is_err() {
                t.budget.release(n);
                break;
            }
        }
        drop(tx);
        t.reap(false, &mut self.first_file_done)
    }

    /// Write a sparse file on this thread: `meta.size` bytes of data from `data`, segment
    /// by segment at their offsets, then the length set to `len`; the rest are holes.
    pub fn sparse_file(
        &mut self,
        meta: FileMeta,
        segments: &[Segment],
        len: u64,
        data: &mut dyn Read,
        reserve: Reserve<'_>,
    ) -> Result<(), ExtractError> {
        if self.buf.len() < CHUNK {
            self.buf = vec![0; CHUNK];
        }
        let queued = self.queued();
        let file = create(&meta)?;
        for s in segments {
            let mut left = s.len;
            let mut at = s.offset;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                reserve(n as u64, queued)?;
                data.read_exact(&mut self.buf[..n])
                    .map_err(|e| read_error(e, &meta.entry))?;
                file.write_all_at(&self.buf[..n], at)
                    .map_err(|e| io_error(&meta.entry, "write", e))?;
                left -= n as u64;
                at += n as u64;
            }
        }
        file.set_len(len)
            .map_err(|e| io_error(&meta.entry, "set the length of", e))?;
        finish(&meta, &file)?;
        self.first_file_done.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Wait until no job for `key` is in flight (by draining all of them).
    pub fn settle(&mut self, key: &Key) -> Result<(), ExtractError> {
        match self.threads.as_mut() {
            Some(t) if t.in_flight.contains(key) => t.drain(&mut self.first_file_done),
            Some(t) => t.reap(false, &mut self.first_file_done),
            None => Ok(()),
        }
    }

    /// Wait until every dispatched job is done.
    pub fn drain(&mut self) -> Result<(), ExtractError> {
        match self.threads.as_mut() {
            Some(t) => t.drain(&mut self.first_file_done),
            None => Ok(()),
        }
    }

    /// Stop the writers (after an error elsewhere); queued jobs are dropped.
    pub fn abort(&mut self) {
        if let Some(mut t) = self.threads.take() {
            t.abort.store(true, Ordering::Relaxed);
            t.jobs = None;
            for h in t.handles.drain(..) {
                let _ = h.join();
            }
        }
    }

    /// Finish all jobs and stop the writers.
    pub fn finish(&mut self) -> Result<(), ExtractError> {
        let result = self.drain();
        if result.is_err() {
            self.abort();
        } else if let Some(mut t) = self.threads.take() {
            t.jobs = None;
            for h in t.handles.drain(..) {
                let _ = h.join();
            }
        }
        result
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.abort();
    }
}

impl Threads {
    fn spawn(n: usize) -> io::Result<Threads> {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let budget = Arc::new(Budget {
            state: Mutex::new((0, false)),
            freed: Condvar::new(),
        });
        let abort = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let (jobs, done, budget, abort) = (
                jobs_rx.clone(),
                done_tx.clone(),
                budget.clone(),
                abort.clone(),
            );
            let h = std::thread::Builder::new()
                .name(format!("vrun-writer-{i}"))
                .spawn(move || writer_loop(jobs, done, budget, abort))?;
            handles.push(h);
        }
        Ok(Threads {
            jobs: Some(jobs_tx),
            done: done_rx,
            handles,
            in_flight: HashSet::new(),
            budget,
            abort,
            error: None,
        })
    }

    fn send(&mut self, job: Job) {
        self.in_flight.insert(job.key.clone());
        if let Some(tx) = &self.jobs {
            // Writers only exit when `jobs` is dropped, so this cannot fail.
            let _ = tx.send(job);
        }
    }

    fn handle(&mut self, d: Done, first: &mut Option<Instant>) {
        self.in_flight.remove(&d.key);
        match d.result {
            Ok(at) => {
                if first.is_none_or(|f| at < f) {
                    *first = Some(at);
                }
            }
            Err(ExtractError::Aborted) => {}
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    /// Collect finished jobs; with `block`, wait for at least one if any is in flight.
    fn reap(&mut self, block: bool, first: &mut Option<Instant>) -> Result<(), ExtractError> {
        if block && !self.in_flight.is_empty() {
            if let Ok(d) = self.done.recv() {
                self.handle(d, first);
            }
        }
        while let Ok(d) = self.done.try_recv() {
            self.handle(d, first);
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn drain(&mut self, first: &mut Option<Instant>) -> Result<(), ExtractError> {
        while !self.in_flight.is_empty() {
            self.reap(true, first)?;
        }
        self.reap(false, first)
    }
}

fn writer_loop(
    jobs: Receiver<Job>,
    done: Sender<Done>,
    budget: Arc<Budget>,
    abort: Arc<AtomicBool>,
) {
    for job in jobs {
        let result = if abort.load(Ordering::Relaxed) {
            release_all(job.data, job.meta.size, &budget);
            Err(ExtractError::Aborted)
        } else {
            let r = write_job(&job.meta, job.data, &budget);
            if r.is_err() {
                abort.store(true, Ordering::Relaxed);
            }
            r
        };
        budget.release(JOB_OVERHEAD);
        if done
            .send(Done {
                key: job.key,
                result,
            })
            .is_err()
        {
            return;
        }
    }
}

fn release_all(data: Data, size: u64, budget: &Budget) {
    match data {
        Data::Whole(_) => budget.release(size),
        Data::Stream(rx) => {
            for chunk in rx {
                budget.release(chunk.len() as u64);
            }
        }
    }
}

fn write_job(meta: &FileMeta, data: Data, budget: &Budget) -> Result<Instant, ExtractError> {
    let mut file = match create(meta) {
        Ok(f) => f,
        Err(e) => {
            release_all(data, meta.size, budget);
            return Err(e);
        }
    };
    match data {
        Data::Whole(bytes) => {
            let r = file.write_all(&bytes);
            budget.release(meta.size);
            r.map_err(|e| io_error(&meta.entry, "write", e))?;
        }
        Data::Stream(rx) => {
            let mut got = 0u64;
            let mut failed = None;
            for chunk in rx {
                if failed.is_none() {
                    if let Err(e) = file.write_all(&chunk) {
                        failed = Some(e);
                    }
                }
                got += chunk.len() as u64;
                budget.release(chunk.len() as u64);
            }
            if let Some(e) = failed {
                return Err(io_error(&meta.entry, "write", e));
            }
            if got != meta.size {
                // The parse thread stopped feeding us; it reports why.
                return Err(ExtractError::Aborted);
            }
        }
    }
    finish(meta, &file)?;
    crate::writeback::written(&file); // start its writeback now, fsync at publish
    Ok(Instant::now())
}

fn write_inline(
    meta: &FileMeta,
    data: &mut dyn Read,
    buf: &mut [u8],
    reserve: Reserve<'_>,
) -> Result<Instant, ExtractError> {
    let mut file = create(meta)?;
    let mut left = meta.size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if meta.size > SMALL_FILE {
            reserve(n as u64, 0)?;
        }
        data.read_exact(&mut buf[..n])
            .map_err(|e| read_error(e, &meta.entry))?;
        file.write_all(&buf[..n])
            .map_err(|e| io_error(&meta.entry, "write", e))?;
        left -= n as u64;
    }
    finish(meta, &file)?;
    crate::writeback::written(&file); // start its writeback now, fsync at publish
    Ok(Instant::now())
}

/// Create the file; a non-directory already at the name is replaced (later entry wins),
/// never written through.
fn create(meta: &FileMeta) -> Result<File, ExtractError> {
    let dir = meta.dir.fd.as_fd();
    let perm = meta.perm & 0o777;
    match tree::create_file(dir, &meta.name, perm) {
        Ok(fd) => return Ok(File::from(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(io_error(&meta.entry, "create", e)),
    }
    match tree::unlinkat(dir, &meta.name, false) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
            return Err(ExtractError::Rejected {
                entry: meta.entry.clone(),
                reason: "a directory reached through a symlink is in the way".into(),
            })
        }
        Err(e) => return Err(io_error(&meta.entry, "replace", e)),
    }
    tree::create_file(dir, &meta.name, perm)
        .map(File::from)
        .map_err(|e| io_error(&meta.entry, "create", e))
}

/// Owner, then mode if needed (chown clears setuid/setgid), then xattrs (chown and writes
/// clear `security.capability`), then mtime — all on the fd.
fn finish(meta: &FileMeta, file: &File) -> Result<(), ExtractError> {
    let fd = file.as_fd();
    if let Some(o) = meta.chown {
        tree::fchown(fd, o.uid, o.gid).map_err(|e| io_error(&meta.entry, "chown", e))?;
    }
    // The file was created with its permission bits; chmod only for what `open` cannot set
    // (setuid/setgid/sticky, which chown would clear anyway) or what the umask took away.
    if meta.perm & 0o7000 != 0 || meta.perm & umask() != 0 {
        tree::fchmod(fd, meta.perm).map_err(|e| io_error(&meta.entry, "chmod", e))?;
    }
    for (name, value) in &meta.xattrs {
        tree::fsetxattr(fd, name, value).map_err(|e| xattr_error(&meta.entry, name, e))?;
    }
    tree::futimens(fd, meta.mtime).map_err(|e| io_error(&meta.entry, "set mtime of", e))
}

pub fn xattr_error(entry: &str, name: &std::ffi::CStr, source: io::Error) -> ExtractError {
    ExtractError::Io {
        entry: format!("{entry} (xattr {})", name.to_string_lossy()),
        op: "set extended attribute",
        source,
    }
}

/// The process umask, read once from /proc (reading it with umask(2) would briefly change
/// it for every thread). Unknown → assume it may strip anything, so we always chmod.
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o777)
    })
}

fn check_read(read: io::Result<u64>, size: u64, entry: &str) -> Result<(), ExtractError> {
    match read {
        Ok(n) if n == size => Ok(()),
        Ok(_) => Err(ExtractError::Truncated {
            entry: entry.to_string(),
        }),
        Err(e) => Err(read_error(e, entry)),
    }
}
