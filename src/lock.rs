//! The runner contract's lock: a non-blocking exclusive `flock` on the proc.yaml itself.
//!
//! Velociraptor may fire `setup`, `run` and `teardown` for the same proc from different
//! processes; the spec makes them exclusive by locking FILE, and operators poke at it with
//! util-linux `flock FILE …`, so the lock must be `flock(2)` on that very file (not a
//! sidecar lock file, not `fcntl` record locks, which `flock(1)` does not see). It never
//! waits: a second command fails at once with the exact message Velociraptor greps for.
//! `uptest` and `shell` take no lock, so they work while `run` holds it for the life of
//! the container — the guard is a plain value the caller keeps alive.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Holds the lock until dropped (closing the file releases it).
#[derive(Debug)]
pub struct FileLock {
    _flock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The exact wording of the runner contract.
    #[error("{shown} is locked by another process.")]
    Busy { shown: String },
    #[error("cannot open {path} to lock it")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}")]
    Flock { path: PathBuf, source: Errno },
}

impl FileLock {
    /// Lock `path` or fail at once. `shown` is FILE as the user typed it, for the message.
    pub fn try_exclusive(path: &Path, shown: &str) -> Result<FileLock, LockError> {
        let file = File::open(path).map_err(|source| LockError::Open {
            path: path.to_owned(),
            source,
        })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => Ok(FileLock { _flock: flock }),
            Err((_, Errno::EWOULDBLOCK)) => Err(LockError::Busy {
                shown: shown.to_string(),
            }),
            Err((_, source)) => Err(LockError::Flock {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_fast_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proc.yaml");
        std::fs::write(&file, "{}").unwrap();
        let first = FileLock::try_exclusive(&file, "proc.yaml").unwrap();
        let err = FileLock::try_exclusive(&file, "proc.yaml").unwrap_err();
        assert_eq!(err.to_string(), "proc.yaml is locked by another process.");
        drop(first);
        FileLock::try_exclusive(&file, "proc.yaml").unwrap();
    }
}
