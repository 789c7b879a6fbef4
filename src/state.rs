//! The proc's state file: which cached layers make up its root filesystem.
//!
//! `setup` writes it once the layers are published; `run`, `shell`, `uptest` read it to
//! mount the overlay; `teardown` and `vrun cache gc` read it to know which layers are
//! in use. It is versioned (a newer vrun refuses to misread an unknown version) and
//! written as temp file + rename, never truncated in place.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Current state file format.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcState {
    pub version: u32,
    /// Published build layer (holds the build under `app/`), if the proc has a build.
    pub build_layer: Option<PathBuf>,
    /// Published image layer (an OS root), if the proc has an image.
    pub image_layer: Option<PathBuf>,
    /// Numeric owner the build layer was extracted for and the app runs as.
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read proc state {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write proc state {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("proc state {path} is not valid")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("proc state {path} has version {found}, this vrun understands {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

impl ProcState {
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = std::fs::read(path).map_err(|source| StateError::Read {
            path: path.to_owned(),
            source,
        })?;
        let state: ProcState =
            serde_json::from_slice(&text).map_err(|source| StateError::Parse {
                path: path.to_owned(),
                source,
            })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Version {
                path: path.to_owned(),
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Write atomically ([`vrun_cache::write_atomic`]: temp sibling, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let body = serde_json::to_vec_pretty(self).expect("state serializes");
        vrun_cache::write_atomic(path, &body, 0o644, None).map_err(|source| StateError::Write {
            path: path.to_owned(),
            source,
        })
    }
}
