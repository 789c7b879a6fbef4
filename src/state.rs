//! The proc's state file: which cached layers make up its root filesystem.
//!
//! `setup` writes it once the layers are published; `run`, `shell`, `uptest` read it to
//! mount the overlay; `teardown` and `vrun cache gc` read it to know which layers are
//! in use. It is versioned (a newer vrun refuses to misread an unknown version) and
//! written as temp file + rename, never truncated in place.
//!
//! Version 2 records each layer by its [`LayerKey`] (blob sha256, kind, owner, storage),
//! the store's own name for it; the layer's root is resolved from the key and the root's
//! store (`vrun_cache::layer_root`) when the file is read. Version 1 recorded
//! absolute root paths, and gc matched them against store paths by prefix, so a state
//! file was only as good as the path spelling (a symlinked `VR_ROOT`, a moved store).
//! Version 1 files are still read (their paths are turned back into keys; a path that
//! is not a layer root of this root's store is refused, naming the file) and are
//! rewritten as version 2 by the next setup.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vrun_cache::LayerKey;
use vrun_cache::{layer_key_of_root, layer_root};

/// Current state file format.
pub const STATE_VERSION: u32 = 2;

/// A proc's layers, by key and resolved to their roots in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcState {
    /// The build layer (holds the build under `app/`), if the proc has a build.
    pub build: Option<LayerKey>,
    /// The image layer (an OS root), if the proc has an image.
    pub image: Option<LayerKey>,
    /// Where [`ProcState::build`]'s root is (resolved, not stored).
    pub build_layer: Option<PathBuf>,
    /// Where [`ProcState::image`]'s root is (resolved, not stored).
    pub image_layer: Option<PathBuf>,
    /// Numeric owner the build layer was extracted for and the app runs as.
    pub uid: u32,
    pub gid: u32,
}

/// The file as written (version 2).
#[derive(Serialize, Deserialize)]
struct FileV2 {
    version: u32,
    build: Option<LayerKey>,
    image: Option<LayerKey>,
    uid: u32,
    gid: u32,
}

/// The file as vrun wrote it before keys (version 1).
#[derive(Deserialize)]
struct FileV1 {
    build_layer: Option<PathBuf>,
    image_layer: Option<PathBuf>,
    uid: u32,
    gid: u32,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
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
    #[error("proc state {path} has version {found}, this vrun understands 1 and {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("proc state {path}: {field} {layer} is not a layer of the store {store}")]
    NotALayer {
        path: PathBuf,
        field: &'static str,
        layer: PathBuf,
        store: PathBuf,
    },
}

impl ProcState {
    /// The state of a proc made of these layers of the store at `store_dir`.
    pub fn new(
        store_dir: &Path,
        build: Option<LayerKey>,
        image: Option<LayerKey>,
        uid: u32,
        gid: u32,
    ) -> ProcState {
        ProcState {
            build_layer: build.as_ref().map(|k| layer_root(store_dir, k)),
            image_layer: image.as_ref().map(|k| layer_root(store_dir, k)),
            build,
            image,
            uid,
            gid,
        }
    }

    /// Reads `path`, resolving its layers in the store at `store_dir`.
    pub fn load(path: &Path, store_dir: &Path) -> Result<Self, StateError> {
        let text = std::fs::read(path).map_err(|source| StateError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse_err = |source| StateError::Parse {
            path: path.to_owned(),
            source,
        };
        let version = serde_json::from_slice::<VersionOnly>(&text)
            .map_err(parse_err)?
            .version;
        match version {
            STATE_VERSION => {
                let f: FileV2 = serde_json::from_slice(&text).map_err(parse_err)?;
                Ok(ProcState::new(store_dir, f.build, f.image, f.uid, f.gid))
            }
            1 => {
                let f: FileV1 = serde_json::from_slice(&text).map_err(parse_err)?;
                let key = |field, root: Option<PathBuf>| {
                    root.map(|layer| {
                        layer_key_of_root(store_dir, &layer).ok_or_else(|| StateError::NotALayer {
                            path: path.to_owned(),
                            field,
                            layer,
                            store: store_dir.to_owned(),
                        })
                    })
                    .transpose()
                };
                let build = key("build_layer", f.build_layer)?;
                let image = key("image_layer", f.image_layer)?;
                Ok(ProcState::new(store_dir, build, image, f.uid, f.gid))
            }
            found => Err(StateError::Version {
                path: path.to_owned(),
                found,
            }),
        }
    }

    /// Write atomically ([`vrun_cache::write_atomic`]: temp sibling, fsync, rename), as
    /// version [`STATE_VERSION`].
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let file = FileV2 {
            version: STATE_VERSION,
            build: self.build.clone(),
            image: self.image.clone(),
            uid: self.uid,
            gid: self.gid,
        };
        let body = serde_json::to_vec_pretty(&file).expect("state serializes");
        vrun_cache::write_atomic(path, &body, 0o644, None).map_err(|source| StateError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// The proc's layers, build first, as (key, root).
    pub fn layers(&self) -> impl Iterator<Item = (&LayerKey, &Path)> {
        [
            self.build.as_ref().zip(self.build_layer.as_deref()),
            self.image.as_ref().zip(self.image_layer.as_deref()),
        ]
        .into_iter()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrun_cache::{LayerKind, LayerStorage};

    fn key(kind: LayerKind, storage: LayerStorage) -> LayerKey {
        LayerKey::new("ab".repeat(32), kind, 1000, 1000).stored_as(storage)
    }

    #[test]
    fn version_2_round_trips_keys_and_resolves_roots_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("cache");
        let path = dir.path().join("state.json");
        let build = key(LayerKind::Build, LayerStorage::Erofs);
        let image = LayerKey::new("cd".repeat(32), LayerKind::Image, 0, 0);
        let state = ProcState::new(&store, Some(build.clone()), Some(image.clone()), 1000, 1000);
        state.save(&path).unwrap();
        let text: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(text["version"], 2);
        assert_eq!(text["build"]["storage"], "erofs");
        assert!(
            text.get("build_layer").is_none(),
            "no paths on disk: {text}"
        );
        let back = ProcState::load(&path, &store).unwrap();
        assert_eq!(back, state);
        assert_eq!(
            back.build_layer.unwrap(),
            store.join(format!("layers-erofs-v1/{}/root", build.dir_name()))
        );
        assert_eq!(
            back.image_layer.unwrap(),
            store.join(format!("layers-v1/{}/root", image.dir_name()))
        );
    }

    /// What vrun wrote before keys: absolute layer roots.
    #[test]
    fn version_1_paths_are_read_back_as_keys_and_foreign_paths_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("cache");
        let path = dir.path().join("state.json");
        let build = key(LayerKind::Build, LayerStorage::Dir);
        let root = store.join(format!("layers-v1/{}/root", build.dir_name()));
        let v1 = serde_json::json!({
            "version": 1, "build_layer": root, "image_layer": null, "uid": 1000, "gid": 1000,
        });
        std::fs::write(&path, v1.to_string()).unwrap();
        let state = ProcState::load(&path, &store).unwrap();
        assert_eq!(state.build, Some(build));
        assert_eq!(state.build_layer.as_deref(), Some(root.as_path()));
        assert_eq!(state.image, None);

        let elsewhere = dir.path().join("other/layers-v1/x/root");
        let v1 = serde_json::json!({
            "version": 1, "build_layer": elsewhere, "image_layer": null, "uid": 0, "gid": 0,
        });
        std::fs::write(&path, v1.to_string()).unwrap();
        let err = ProcState::load(&path, &store).unwrap_err().to_string();
        assert!(
            err.contains("build_layer") && err.contains("is not a layer of the store"),
            "{err}"
        );

        std::fs::write(&path, r#"{"version": 3}"#).unwrap();
        let err = ProcState::load(&path, &store).unwrap_err().to_string();
        assert!(err.contains("has version 3"), "{err}");
    }
}
