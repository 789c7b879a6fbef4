//! Where vrun keeps things on the host.
//!
//! One root (`VR_ROOT`, default `/apps`; tests always pass a temp dir) holds the
//! content-addressed cache and one directory per proc. Every path the runner touches
//! is derived here, so the on-disk layout documented in the README has exactly one
//! source of truth.

use std::path::{Path, PathBuf};

/// Default root, as in the original runner (`vr.common` paths).
pub const DEFAULT_ROOT: &str = "/apps";

/// The vrun root directory (`$VR_ROOT`).
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The content-addressed store (`vrun-cache`).
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }

    /// Parent of every proc dir; also the `-P` lxcpath given to LXC.
    pub fn procs_dir(&self) -> PathBuf {
        self.dir.join("procs")
    }

    pub fn proc(&self, container_name: &str) -> ProcPaths {
        ProcPaths {
            dir: self.procs_dir().join(container_name),
        }
    }
}

/// The files and directories of one proc: `$VR_ROOT/procs/<container name>/`.
#[derive(Debug, Clone)]
pub struct ProcPaths {
    pub dir: PathBuf,
}

impl ProcPaths {
    /// Overlay upper dir: the proc's own writes, plus `env.sh`, `proc.sh`, `settings.yaml`.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    /// Overlay work dir (same filesystem as `upper`, separate subtree).
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// Overlay mount point; `lxc.rootfs.path` of every container of this proc.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    /// LXC config written by setup.
    pub fn lxc_config(&self) -> PathBuf {
        self.dir.join("proc.lxc")
    }
    /// Which cached layers this proc uses (see [`crate::state`]).
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// Lock serialising the overlay mount between run/shell/uptest.
    pub fn mount_lock(&self) -> PathBuf {
        self.dir.join(".mount.lock")
    }
    /// Scratch dir of a shell/uptest container `<name>-TMP<id>`.
    pub fn tmp_dir(&self, id: &str) -> PathBuf {
        self.dir.join(format!("tmp-{id}"))
    }
}
