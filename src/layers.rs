//! Layers as procs stack them: which storage a new layer gets, and the one host-wide
//! mount of every EROFS layer.
//!
//! # One mount per layer, owned by the store
//!
//! An EROFS layer (`vrun_cache::LayerStorage::Erofs`) is an image file beside an empty
//! `root/` in its store dir. [`ensure_ready`] mounts the image read-only on that `root/`
//! — file-backed where the kernel can (Linux ≥ 6.12), else through a loop device
//! ([`crate::erofs::mount`]), always `nodev`, and `nosuid` for builds — and every proc of
//! that layer names the same `root/` as its overlay lower. So a hundred procs of one build
//! cost one mount, and a second proc's setup costs no mount of the layer at all: the
//! mount is found in place. "Mounted" is decided by the mount table (the mount on
//! `root/` must be EROFS, from this layer's image, directly or through its loop
//! device), under an `flock` on the layer dir so two setups or uptests never mount it
//! twice. After a reboot nothing is mounted; `run`, `shell` and `uptest` call
//! [`ensure_ready`] (through the overlay mount, `crate::lxc::mount`) before mounting
//! the proc's overlay.
//!
//! Nothing in vrun unmounts a layer but the store: teardown of one proc unmounts its
//! overlay only (the others go on using the layer), and gc or verify take the image off
//! `root/` before removing or quarantining the layer (`vrun_cache`, lazily, so an
//! overlay still using it keeps its own reference).
//!
//! # Which storage
//!
//! [`LayersRequest`] comes from `setup --layers erofs|dir`, else `VRUN_LAYERS`, else
//! `auto`. A forced kind is used as is: `erofs` where EROFS cannot work fails with the
//! mount's reason, `dir` never mounts anything. `auto` reuses a layer of either kind, and
//! for a new one asks [`crate::erofs::mount::probe_first`] once per process, on the
//! store's own filesystem (a file on tmpfs may back a loop device but not every kernel's
//! file-backed mount; whether it can is part of the question), and falls back to
//! directory layers, the caller saying so in one line naming why (no kernel support,
//! mount refused, no loop device).
//!
//! Why EROFS by default, measured with `cargo bench --bench deploy` (full corpus: 12 000
//! files, 262 MB, `.tar.gz` 88 MB; medians of 3–5 pairs, caches dropped; load 1.8–3.6 on
//! the shared 2-core VM): on the slow disk (40 MiB/s, 1000 IOPS) a cold setup took 8.6 s
//! with an EROFS layer against 19.7 s with a directory layer (the shell pipeline
//! 19.4 s): one sequential file instead of 12 000 small ones; 6.5 s without the blob. On
//! a fresh loop ext4, 0.81 s against 1.05 s. On **tmpfs** it is the other way round —
//! 0.89 s against 0.65 s: there is no disk to spare, and what remains is the image's
//! sha256 (0.18 s for 232 MB, hidden behind the fsync on a real disk) and a second copy
//! of every page (tmpfs's and EROFS's own cache) — so auto keeps directory layers on
//! tmpfs, silently (nothing is wrong), and `--layers erofs` still forces an image there.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vrun_cache::{LayerKey, LayerKind, LayerStorage};

use crate::erofs::mount::{self, Method, MountError, MountOptions};

/// Environment variable choosing the layer storage (`erofs`, `dir` or `auto`) when
/// setup's `--layers` does not.
pub const LAYERS_ENV: &str = "VRUN_LAYERS";

/// Name of a layer's image inside its store dir (what `vrun_cache` publishes).
const LAYER_IMAGE: &str = "image.erofs";

/// What setup was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayersRequest {
    /// EROFS where this host can mount it, else directories (said once on stderr).
    #[default]
    Auto,
    /// Exactly this storage.
    Force(LayerStorage),
}

impl LayersRequest {
    /// `erofs`, `dir` or `auto`.
    pub fn parse(s: &str) -> Option<LayersRequest> {
        match s {
            "auto" => Some(LayersRequest::Auto),
            s => LayerStorage::parse(s).map(LayersRequest::Force),
        }
    }

    /// `--layers` when given, else `VRUN_LAYERS`, else auto; a bad value names where it
    /// came from.
    pub fn from_flag_or_env(
        flag: Option<&str>,
        env: Option<&str>,
    ) -> Result<LayersRequest, LayersError> {
        let (value, from) = match (flag, env) {
            (Some(v), _) => (v, "--layers"),
            (None, Some(v)) if !v.is_empty() => (v, LAYERS_ENV),
            _ => return Ok(LayersRequest::Auto),
        };
        LayersRequest::parse(value).ok_or_else(|| LayersError::BadRequest {
            from,
            value: value.to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayersError {
    #[error("{from}: {value:?} is not a layer storage (erofs, dir or auto)")]
    BadRequest { from: &'static str, value: String },
    #[error("EROFS layers were asked for (--layers erofs or VRUN_LAYERS=erofs), but {why}")]
    Unusable { why: String },
    #[error("cannot lock layer {dir}")]
    Lock {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("layer {root} is not ready: {reason}")]
    NotReady { root: PathBuf, reason: String },
    #[error("layer {root} is mounted over by {fstype} from {source_dev}, not its image {image}")]
    ForeignMount {
        root: PathBuf,
        image: PathBuf,
        fstype: String,
        source_dev: String,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Mounts(#[from] crate::mounts::MountError),
}

/// The storage `request` resolves to for layers stored under `cache_dir`, and, when auto
/// fell back to directories, why (the caller says so once).
///
/// Only a setup that extracts asks (a layer hit tries both storages in auto mode, and a
/// mount that works proves itself), so the probe — a tiny image written without fsync,
/// mounted and unmounted, a few milliseconds — runs at most once per cold setup: its
/// verdict is kept for the rest of the process.
///
/// Forced EROFS is probed too, so that a host which cannot mount it fails before the
/// download, not after publishing a layer nobody can use.
pub fn decide(
    request: LayersRequest,
    cache_dir: &Path,
) -> Result<(LayerStorage, Option<String>), LayersError> {
    static PROBED: OnceLock<Option<String>> = OnceLock::new();
    let unusable = || {
        PROBED.get_or_init(|| {
            let probe = mount::probe_first(&cache_dir.join("ingest-v1"));
            probe.method().is_none().then(|| probe.summary())
        })
    };
    match request {
        LayersRequest::Force(LayerStorage::Dir) => Ok((LayerStorage::Dir, None)),
        LayersRequest::Force(LayerStorage::Erofs) => match unusable() {
            None => Ok((LayerStorage::Erofs, None)),
            Some(why) => Err(LayersError::Unusable { why: why.clone() }),
        },
        // tmpfs: nothing to gain (see the module note), and the image's pages would be
        // held twice, as tmpfs pages and as EROFS's own page cache.
        LayersRequest::Auto if on_tmpfs(cache_dir) => Ok((LayerStorage::Dir, None)),
        LayersRequest::Auto => Ok(match unusable() {
            None => (LayerStorage::Erofs, None),
            Some(why) => (
                LayerStorage::Dir,
                Some(format!("{why}; using directory layers")),
            ),
        }),
    }
}

/// Whether `dir` is on tmpfs.
fn on_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: statfs(2) with a NUL-terminated path fills the struct on success.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: initialized by the successful call.
    unsafe { st.assume_init() }.f_type == libc::TMPFS_MAGIC
}

/// The storages a layer hit may be in, preferred first: the forced one, or in auto mode
/// either (an EROFS layer first; a directory layer from before is as good as a new one).
pub fn reusable(request: LayersRequest) -> &'static [LayerStorage] {
    match request {
        LayersRequest::Force(LayerStorage::Dir) => &[LayerStorage::Dir],
        LayersRequest::Force(LayerStorage::Erofs) => &[LayerStorage::Erofs],
        LayersRequest::Auto => &[LayerStorage::Erofs, LayerStorage::Dir],
    }
}

/// Makes the layer whose root is `root` usable as an overlay lower: a directory layer
/// already is; an EROFS layer's image is mounted on its root unless it is already (see
/// the module note). Returns how it is mounted (`None` for a directory layer).
pub fn ensure_ready(root: &Path) -> Result<Option<Method>, LayersError> {
    let Some(key) = LayerKey::from_root(root) else {
        return Ok(None); // not a store layer (tests, the empty lower): nothing to do
    };
    if key.storage != LayerStorage::Erofs {
        return Ok(None);
    }
    let dir = root.parent().expect("a layer root has a parent");
    let image = dir.join(LAYER_IMAGE);
    if !image.is_file() || !root.is_dir() {
        return Err(LayersError::NotReady {
            root: root.to_owned(),
            reason: "the layer's image or mount point is missing (was the cache cleaned? run setup again)"
                .into(),
        });
    }
    // Cheap common case first: mounted already (a warm setup, a second uptest).
    if let Some(method) = mounted_method(root, &image)? {
        return Ok(Some(method));
    }
    let _lock = lock_dir(dir)?;
    if let Some(method) = mounted_method(root, &image)? {
        return Ok(Some(method)); // whoever we waited for mounted it
    }
    let opts = MountOptions {
        nosuid: key.kind == LayerKind::Build,
        force_loop: false,
    };
    let m = mount::mount_image(&image, root, &opts)?;
    Ok(Some(m.method))
}

/// How `image` is mounted on `root`, if it is; an error if something else is.
fn mounted_method(root: &Path, image: &Path) -> Result<Option<Method>, LayersError> {
    if !vrun_cache::is_mounted(root) {
        return Ok(None);
    }
    let canonical_root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    if let Some(m) = mount::find_mounts(image)?
        .into_iter()
        .find(|m| m.target == canonical_root)
    {
        return Ok(Some(m.method));
    }
    let top = crate::mounts::mounts()?
        .into_iter()
        .rfind(|m| m.mount_point == canonical_root);
    Err(LayersError::ForeignMount {
        root: root.to_owned(),
        image: image.to_owned(),
        fstype: top.as_ref().map_or("?".into(), |m| m.fs_type.clone()),
        source_dev: top.map_or("?".into(), |m| m.source),
    })
}

/// An exclusive `flock` on the layer dir, released when the file is dropped.
fn lock_dir(dir: &Path) -> Result<File, LayersError> {
    let err = |source| LayersError::Lock {
        dir: dir.to_owned(),
        source,
    };
    let f = File::open(dir).map_err(err)?;
    // SAFETY: flock on a valid, owned fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_from_flag_then_env() {
        let erofs = LayersRequest::Force(LayerStorage::Erofs);
        let dir = LayersRequest::Force(LayerStorage::Dir);
        assert_eq!(
            LayersRequest::from_flag_or_env(None, None).unwrap(),
            LayersRequest::Auto
        );
        assert_eq!(
            LayersRequest::from_flag_or_env(None, Some("erofs")).unwrap(),
            erofs
        );
        assert_eq!(
            LayersRequest::from_flag_or_env(Some("dir"), Some("erofs")).unwrap(),
            dir
        );
        assert_eq!(
            LayersRequest::from_flag_or_env(None, Some("")).unwrap(),
            LayersRequest::Auto
        );
        let e = LayersRequest::from_flag_or_env(None, Some("squashfs")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VRUN_LAYERS: \"squashfs\" is not a layer storage (erofs, dir or auto)"
        );
    }
}
