//! The store's error type. Every variant names the file or key involved; io errors come
//! from `fs-err` (which puts the path in the message) or from [`StoreError::io`].

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An io error whose message already names its path and operation.
    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error(
        "cache layout marker {path} says version {found}, this vrun understands up to \
         {supported}; leaving the cache alone (use a newer vrun, or another --root)"
    )]
    FutureLayout {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    #[error("cache layout marker {path} is not a version number (starts with {content:?}); leaving the cache alone")]
    BadLayoutMarker { path: PathBuf, content: String },

    #[error("invalid {what} {value:?}: expected {expected}")]
    BadDigest {
        what: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("ingest blob {path} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("layer staging dir {path} is not a directory")]
    NotADirectory { path: PathBuf },

    #[error("layer image {path} is not a regular file")]
    NotAFile { path: PathBuf },

    #[error("layer {key} is not stored as {expected}: publish it with the matching call")]
    WrongStorage { key: String, expected: &'static str },

    #[error("{path} is still mounted after unmounting it")]
    StillMounted { path: PathBuf },

    #[error(
        "cache maintenance ({what}) needs the store opened exclusively (Store::open_exclusive)"
    )]
    NotExclusive { what: &'static str },
}

impl StoreError {
    /// Wraps a raw io error (from libc calls) so its message names the operation and path.
    pub(crate) fn io(op: &str, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io(std::io::Error::new(
            source.kind(),
            format!("{op} {}: {source}", path.display()),
        ))
    }
}
