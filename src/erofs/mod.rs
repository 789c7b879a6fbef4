//! EROFS images (essay to come).

pub mod format;
pub mod mount;
mod writer;

pub use writer::{
    Entry, EntryKind, ErofsError, Extent, ImageStats, ImageWriter, Invalid, Metadata,
    WriterOptions, SYMLINK_MAX,
};
