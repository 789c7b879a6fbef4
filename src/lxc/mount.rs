//! The proc's root filesystem: one overlay, mounted by vrun on `<proc>/rootfs`.
//!
//! `lowerdir=<build layer>:<image layer>` (build on top: it holds `app/`), `upperdir=
//! <proc>/upper` (the proc's own writes and its `env.sh`, `proc.sh`, `settings.yaml`),
//! `workdir=<proc>/work`. Layers come from the cache and are never written: the overlay
//! is what lets a hundred procs share one extracted image and build.
//!
//! Why vrun mounts it rather than LXC: LXC 5 refuses an overlay mount entry over the rootfs,
//! and its own `overlay:` rootfs type gives each container a private mount of the same
//! upper dir — a second container (shell, uptest) next to the running proc then gets EBUSY
//! or, with `index=off`, a kernel warning about undefined behaviour. One mount shared by
//! every container of the proc has neither problem.
//!
//! `setup` mounts it and leaves it mounted, so the proc's root is visible on the host
//! from then on: supervisord's `directory=<proc>/rootfs/app`, vr.server's check for
//! `rootfs/app/uptests/<proc_name>`, and vr.builder's copies into `rootfs/` (they land in
//! `upper/`) all need it. Mounts do not survive a reboot, so `run`, `shell` and `uptest`
//! all call [`ensure_mounted`] too; it is idempotent and serialised by an `flock` on
//! `<proc>/.mount.lock`, so concurrent uptests never mount twice. Before mounting it
//! makes an empty `app/` in the mount point itself: after a reboot supervisord chdirs to
//! `rootfs/app` before `vrun run` mounts, and an ENOENT there would make the proc FATAL. "Is it mounted" is read
//! from `/proc/self/mountinfo` (the kernel's own table, via [`crate::mounts`]), never
//! guessed from the directory. Unmounting is teardown's, also in [`crate::mounts`].
//!
//! The lowers are store layers: a directory tree, or an EROFS layer's root, on which
//! [`crate::layers::ensure_ready`] mounts the layer's image first if it is not mounted
//! (after a reboot; once per host, shared by every proc of the layer).
//!
//! A proc without an image runs on the host's system directories (`precise` style): the
//! lower is just the build layer, proc.lxc binds `/usr`, `/etc`, … read-only, and this module
//! adds the skeleton (`proc`, `sys`, `dev`, `tmp`, and `bin -> usr/bin`-style symlinks on
//! merged-/usr hosts) to the upper dir through the mount.

use std::fs;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, MsFlags};

use super::config::SystemDir;
use super::{io_err, LxcError};
use crate::mounts;
use crate::paths::ProcPaths;
use crate::state::ProcState;

/// Name of the empty lower dir used when a proc has neither build nor image (overlayfs
/// needs at least one lower layer).
pub const EMPTY_LOWER: &str = "lower-empty";

/// The proc's mount lock (`flock` on `<proc>/.mount.lock`), held while mounting,
/// unmounting, or registering a new temporary container, so teardown cannot unmount and
/// delete a proc while a shell is being started on it.
pub struct MountLock {
    _lock: Flock<fs::File>,
}

impl std::fmt::Debug for MountLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MountLock")
    }
}

/// Take the proc's mount lock (blocking). Fails when the proc dir is gone.
pub fn lock_mount(paths: &ProcPaths) -> Result<MountLock, LxcError> {
    if !paths.dir.is_dir() {
        return Err(LxcError::Gone {
            dir: paths.dir.clone(),
        });
    }
    let lock_path = paths.mount_lock();
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| LxcError::Io {
        path: lock_path.clone(),
        source: e.into(),
    })?;
    Ok(MountLock { _lock: lock })
}

/// Mount the proc's overlay on `<proc>/rootfs` unless it already is. `system_dirs` is
/// non-empty only for procs without an image (see [`super::config::host_system_dirs`]).
pub fn ensure_mounted(
    paths: &ProcPaths,
    state: &ProcState,
    system_dirs: &[SystemDir],
) -> Result<(), LxcError> {
    let lock = lock_mount(paths)?;
    ensure_mounted_locked(&lock, paths, state, system_dirs)
}

/// [`ensure_mounted`] for a caller that already holds the mount lock.
pub fn ensure_mounted_locked(
    _lock: &MountLock,
    paths: &ProcPaths,
    state: &ProcState,
    system_dirs: &[SystemDir],
) -> Result<(), LxcError> {
    // We may have waited for the lock while teardown removed the proc: never recreate it.
    if !paths.state().is_file() {
        return Err(LxcError::Gone {
            dir: paths.dir.clone(),
        });
    }
    let rootfs = paths.rootfs();
    match is_mount_point(&rootfs)? {
        Some(fstype) if fstype == "overlay" => {}
        Some(fstype) => {
            return Err(LxcError::ForeignMount {
                target: rootfs,
                fstype,
            })
        }
        None => mount_overlay(paths, state)?,
    }
    prepare_root(&rootfs, state, system_dirs)
}

fn mount_overlay(paths: &ProcPaths, state: &ProcState) -> Result<(), LxcError> {
    let mut lowers: Vec<PathBuf> = Vec::new();
    for layer in [&state.build_layer, &state.image_layer]
        .into_iter()
        .flatten()
    {
        // An EROFS layer's image is mounted on its root once per host, and stays.
        crate::layers::ensure_ready(layer)?;
        if !layer.is_dir() {
            return Err(LxcError::BadLayer {
                path: layer.clone(),
                reason: "layer directory is missing (was the cache cleaned? run setup again)",
            });
        }
        lowers.push(layer.clone());
    }
    if lowers.is_empty() {
        let empty = paths.dir.join(EMPTY_LOWER);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o555)
            .create(&empty)
            .map_err(io_err(&empty))?;
        lowers.push(empty);
    }
    let (upper, work, rootfs) = (paths.upper(), paths.work(), paths.rootfs());
    for dir in [&upper, &work, &rootfs] {
        if !dir.is_dir() {
            return Err(LxcError::Gone { dir: dir.clone() });
        }
    }
    for p in lowers.iter().chain([&upper, &work]) {
        check_overlay_path(p)?;
    }
    // After a reboot supervisord chdirs into `rootfs/app` before `vrun run` has mounted
    // anything: the mount point itself holds an empty `app`, hidden once mounted.
    let app = rootfs.join("app");
    if fs::symlink_metadata(&app).is_err() {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&app)
            .map_err(io_err(&app))?;
    }
    let lower = lowers
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|source| LxcError::Mount {
        target: rootfs.clone(),
        source,
    })
}

/// overlayfs splits its options on `,` and lower dirs on `:`; a path containing either
/// (or a control character) cannot be expressed safely, so it is refused.
fn check_overlay_path(p: &Path) -> Result<(), LxcError> {
    let s = p.to_string_lossy();
    if s.contains([':', ',', '\\']) || s.chars().any(char::is_control) {
        return Err(LxcError::BadLayer {
            path: p.to_owned(),
            reason: "overlay paths must not contain ':', ',', '\\' or control characters",
        });
    }
    Ok(())
}

/// Directories every container needs, created in the mounted root (hence in upper) only
/// when missing, so an image's own layout always wins.
fn prepare_root(
    rootfs: &Path,
    state: &ProcState,
    system_dirs: &[SystemDir],
) -> Result<(), LxcError> {
    let mkdir = |name: &str, mode: u32| -> Result<(), LxcError> {
        let p = rootfs.join(name);
        if fs::symlink_metadata(&p).is_err() {
            fs::DirBuilder::new()
                .mode(mode)
                .create(&p)
                .map_err(io_err(&p))?;
            // mkdir's mode is filtered by the umask; /tmp needs its sticky 1777 exactly.
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_err(&p))?;
        }
        Ok(())
    };
    // lxc.init.cwd
    mkdir("app", 0o755)?;
    if state.image_layer.is_some() {
        return Ok(());
    }
    for dir in system_dirs {
        if let SystemDir::Symlink(name, target) = dir {
            let p = rootfs.join(name);
            if fs::symlink_metadata(&p).is_err() {
                symlink(target, &p).map_err(io_err(&p))?;
            }
        }
    }
    for (name, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
    ] {
        mkdir(name, mode)?;
    }
    Ok(())
}

/// If `path` is a mount point, the filesystem type mounted there (the topmost mount),
/// from the kernel's table ([`crate::mounts`]).
pub fn is_mount_point(path: &Path) -> Result<Option<String>, LxcError> {
    let Ok(path) = fs::canonicalize(path) else {
        return Ok(None);
    };
    Ok(mounts::mounts()?
        .into_iter()
        .filter(|m| m.mount_point == path)
        .map(|m| m.fs_type)
        .next_back())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_overlay_option_separators() {
        assert!(check_overlay_path(Path::new("/a:b")).is_err());
        assert!(check_overlay_path(Path::new("/a,b")).is_err());
        assert!(check_overlay_path(Path::new("/a/b")).is_ok());
    }
}
