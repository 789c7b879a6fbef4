//! Which cached layers are in use, for `vrun cache ls | gc` and the automatic gc.
//!
//! The store cannot know which layers are in use; the root can. Every proc dir's
//! `state.json` names the keys of the layers its overlay stacks, and the kernel's mount table names
//! the lower dirs of every overlay mounted right now (a live container whose proc dir
//! was damaged still counts). Both go into one [`References`], so gc never removes a
//! layer a proc needs. Callers read them only while holding the store's exclusive lock
//! (see `commands/cache.rs`). A state file that cannot be read is an error when gc must
//! not guess (`strict`), else a warning returned to the caller, which prints it.

use std::path::{Path, PathBuf};

use vrun_cache::References;

use crate::paths::Root;
use crate::state::{ProcState, StateError};

#[derive(Debug, thiserror::Error)]
pub enum ReferencesError {
    #[error("cannot list {path}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot tell which layers proc {name} uses, so gc removes nothing")]
    State { name: String, source: StateError },
}

/// Layers in use under `root` (by key from state files, by path under `cache_dir` from
/// live overlays), and the warnings about
/// state files that could not be read (only when not `strict`).
pub fn references(
    root: &Root,
    cache_dir: &Path,
    strict: bool,
) -> Result<(References, Vec<String>), ReferencesError> {
    let mut refs = References::new();
    let mut warnings = Vec::new();
    let procs = root.procs_dir();
    let list_err = |source| ReferencesError::List {
        path: procs.clone(),
        source,
    };
    let dirs = match std::fs::read_dir(&procs) {
        Ok(d) => Some(d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(list_err(e)),
    };
    for entry in dirs.into_iter().flatten() {
        let entry = entry.map_err(list_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let state_path = root.proc(&name).state();
        if !state_path.exists() {
            continue;
        }
        match ProcState::load(&state_path, cache_dir) {
            Ok(state) => {
                for (key, _) in state.layers() {
                    refs.add_key(key, name.clone());
                }
            }
            Err(source) if strict => return Err(ReferencesError::State { name, source }),
            Err(e) => warnings.push(crate::errors::chain(&e)),
        }
    }
    if let Ok(mounts) = crate::mounts::mounts() {
        for (mount_point, lower) in crate::mounts::overlay_lowers(&mounts) {
            if lower.starts_with(cache_dir) {
                refs.add(lower, format!("mounted on {}", mount_point.display()));
            }
        }
    }
    Ok((refs, warnings))
}
