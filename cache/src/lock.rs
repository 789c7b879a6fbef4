//! Cross-process locks: `flock(2)` on files under `locks-v1/`.
//!
//! flock rather than fcntl locks because an flock belongs to the open file, so two
//! `Store`s in one process exclude each other exactly like two processes do (fcntl locks
//! are per process and would silently merge), and the kernel drops it when the process
//! dies, even on `kill -9`: a crashed setup never leaves a stale lock. Lock files are
//! never deleted while the store is in use; unlinking a lock file someone is waiting on
//! would let a third process lock a fresh inode and run beside them.
//!
//! Two levels:
//! - the store lock: every [`crate::Store`] holds it shared for its whole life; gc and
//!   verify hold it exclusive. So maintenance waits for running setups, and setups wait
//!   for maintenance, instead of racing it.
//! - key locks: one writer per key (a URL, a blob, a layer). Take it, then re-check
//!   whether the work was done meanwhile by the process you waited for.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

/// A held flock; released when dropped (the file is closed).
#[derive(Debug)]
pub struct KeyLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl KeyLock {
    /// The lock file (for messages such as "waiting for …").
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes a lock on `path` (created if needed). `blocking = false` returns `Ok(None)` when
/// another holder conflicts.
pub(crate) fn acquire(
    path: &Path,
    mode: LockMode,
    blocking: bool,
) -> Result<Option<KeyLock>, StoreError> {
    let file = open_lock_file(path)?;
    flock(file, path, mode, blocking)
}

/// Takes an flock on a directory itself (no lock file: the lock lives and dies with the
/// directory, so removing it never strands a waiter). Ingest dirs are held so by their
/// writer; gc removes exactly those it can lock.
pub(crate) fn acquire_dir(path: &Path, blocking: bool) -> Result<Option<KeyLock>, StoreError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| StoreError::io("cannot open", path, e))?;
    flock(file, path, LockMode::Exclusive, blocking)
}

/// Takes a non-blocking exclusive flock on whatever `path` is (file or directory), opened
/// read-only and without following a symlink: `Ok(true)` when nobody holds it.
pub(crate) fn is_unheld(path: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        // A symlink or something we cannot open: nobody can be holding it by flock.
        return true;
    };
    matches!(flock(file, path, LockMode::Exclusive, false), Ok(Some(_)))
}

fn flock(
    file: std::fs::File,
    path: &Path,
    mode: LockMode,
    blocking: bool,
) -> Result<Option<KeyLock>, StoreError> {
    let mut op = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    };
    if !blocking {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: plain syscall on a valid open fd.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(Some(KeyLock {
                _file: file,
                path: path.to_owned(),
            }));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !blocking => return Ok(None),
            _ => return Err(StoreError::io("cannot lock", path, err)),
        }
    }
}

/// The processes holding an flock on `path` (from `/proc/locks`), for "waiting for …"
/// messages. Waiters are not listed; empty when unknown.
pub fn lock_holders(path: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let Ok(table) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INO START END"; waiters have "->".
            if f.get(1) != Some(&"FLOCK") || f.get(5) != Some(&want.as_str()) {
                return None;
            }
            f.get(4)?.parse().ok()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Opens (creating) a lock file. An existing one we may not write to (`vrun cache ls` run
/// by an unprivileged operator on root's cache) is opened read-only: flock needs no write
/// access.
fn open_lock_file(path: &Path) -> Result<std::fs::File, StoreError> {
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path);
    match rw {
        Ok(f) => Ok(f),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EROFS)) => {
            std::fs::File::open(path).map_err(|_| StoreError::io("cannot open lock file", path, e))
        }
        Err(e) => Err(StoreError::io("cannot open lock file", path, e)),
    }
}

/// Maps a caller's key to a lock file name: the key itself when it is a safe, short file
/// name (readable when debugging), otherwise `h-<sha256(key)>`.
pub(crate) fn lock_file_name(key: &str) -> String {
    let safe = !key.is_empty()
        && key.len() <= 160
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if safe {
        format!("{key}.lock")
    } else {
        format!("h-{}.lock", crate::sha256_hex(key.as_bytes()))
    }
}
