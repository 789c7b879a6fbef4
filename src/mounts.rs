//! Mount-aware filesystem operations: is it mounted, unmount it, delete without crossing.
//!
//! A proc directory has the container's overlay mounted on `rootfs/`, and volumes or a
//! stale mount from a crashed run may sit deeper. `rm -rf` through a mount point deletes
//! the *mounted* data — the cached layers, or a host directory given as a volume. So
//! teardown (1) reads `/proc/self/mountinfo` (the kernel's own list; `\040`-style octal
//! escapes decoded) to find mounts, (2) unmounts `rootfs/` and verifies it is gone,
//! falling back to a lazy `MNT_DETACH` when the mount is busy, and (3) removes the tree
//! with `openat`/`unlinkat` relative to directory descriptors, never following a symlink
//! and never descending into anything on another device or listed as a mount point
//! (a bind mount of the same filesystem has the same `st_dev`, hence both checks). What
//! it skips it reports, and the directory is then left in place rather than half-gone
//! with a surprise.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::mount::{umount2, MntFlags};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Where the kernel lists this process's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Mounts stacked on one mount point that [`unmount`] peels off before giving up; a
/// proc's rootfs normally has one, a crashed run's retries may have left a few.
const MAX_STACKED_MOUNTS: usize = 16;

/// One line of `/proc/self/mountinfo` (the parts we use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// The filesystem's own options, as the kernel shows them (still escaped: overlayfs
    /// backslash-escapes `:` and `,` inside its `lowerdir=` paths); see [`overlay_lowers`].
    pub super_options: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read {MOUNTINFO}")]
    MountInfo(#[source] std::io::Error),
    #[error("cannot unmount {path}")]
    Unmount { path: PathBuf, source: Errno },
    #[error("{path} is still mounted after unmounting it")]
    StillMounted { path: PathBuf },
    #[error("cannot remove {path}")]
    Remove { path: PathBuf, source: Errno },
    #[error(
        "left {dir} in place: {} on another filesystem (still mounted?): {}",
        if .skipped.len() == 1 { "this entry is" } else { "these entries are" },
        .skipped.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    CrossesMount { dir: PathBuf, skipped: Vec<PathBuf> },
}

/// Decode mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` `\`).
pub fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Parse mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            if fields.len() < 6 || right.len() < 2 {
                return None;
            }
            Some(MountEntry {
                mount_id: fields[0].parse().ok()?,
                parent_id: fields[1].parse().ok()?,
                mount_point: PathBuf::from(OsStr::from_bytes(&unescape(fields[4]))),
                fs_type: right[0].to_string(),
                source: String::from_utf8_lossy(&unescape(right[1])).into_owned(),
                super_options: right.get(2).copied().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// The lower dirs of every overlay among `mounts`, each with its mount point.
pub fn overlay_lowers(mounts: &[MountEntry]) -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for m in mounts.iter().filter(|m| m.fs_type == "overlay") {
        for opt in split_unescaped(&m.super_options, ',') {
            if let Some(lowers) = opt.strip_prefix("lowerdir=") {
                for lower in split_unescaped(lowers, ':') {
                    let lower = PathBuf::from(OsStr::from_bytes(&unescape(&lower)));
                    out.push((m.mount_point.clone(), lower));
                }
            }
        }
    }
    out
}

/// Splits on `sep` except where it is backslash-escaped (overlayfs escapes `:` and `,`
/// in paths it shows).
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        let last = parts.last_mut().expect("never empty");
        if c == '\\' {
            if let Some(next) = chars.next() {
                if next != sep {
                    last.push('\\');
                }
                last.push(next);
            }
        } else if c == sep {
            parts.push(String::new());
        } else {
            last.push(c);
        }
    }
    parts
}

/// This process's mounts, in mount order.
pub fn mounts() -> Result<Vec<MountEntry>, MountError> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(MountError::MountInfo)?;
    Ok(parse_mountinfo(&text))
}

/// Whether `path` is a mount point. A path that does not exist is not.
pub fn is_mount_point(path: &Path) -> Result<bool, MountError> {
    let Ok(real) = path.canonicalize() else {
        return Ok(false);
    };
    Ok(mounts()?.iter().any(|m| m.mount_point == real))
}

/// Mount points strictly below `dir`.
pub fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>, MountError> {
    let Ok(real) = dir.canonicalize() else {
        return Ok(Vec::new());
    };
    Ok(mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p != &real && p.starts_with(&real))
        .collect())
}

/// Unmount everything mounted on `path` (lazily when busy) and verify it is gone.
pub fn unmount(path: &Path) -> Result<(), MountError> {
    for _ in 0..MAX_STACKED_MOUNTS {
        if !is_mount_point(path)? {
            return Ok(());
        }
        match umount2(path, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) => {}
            Err(Errno::EBUSY) => {
                umount2(path, MntFlags::MNT_DETACH).map_err(|source| MountError::Unmount {
                    path: path.to_owned(),
                    source,
                })?
            }
            Err(source) => {
                return Err(MountError::Unmount {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    if is_mount_point(path)? {
        return Err(MountError::StillMounted {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Directory flags: never follow a symlink, never leak the fd into a child.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Remove `dir` and everything in it that lives on `dir`'s own filesystem. Entries on
/// another device or listed as mount points are left alone and reported as
/// [`MountError::CrossesMount`]. A missing `dir` is success.
pub fn remove_dir_on_one_fs(dir: &Path) -> Result<(), MountError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| MountError::Remove { path, source }
    };
    let fd = match openat(nix::fcntl::AT_FDCWD, dir, dir_flags(), Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(source) => return Err(err(dir)(source)),
    };
    if is_mount_point(dir)? {
        return Err(MountError::CrossesMount {
            dir: dir.to_owned(),
            skipped: vec![dir.to_owned()],
        });
    }
    let walk = Walk {
        dev: fstat(&fd).map_err(err(dir))?.st_dev,
        mount_points: mounts_below(dir)?,
        real_root: dir.canonicalize().unwrap_or_else(|_| dir.to_owned()),
    };
    let mut skipped = Vec::new();
    walk.remove_contents(&fd, dir, Path::new(""), &mut skipped)?;
    drop(fd);
    if !skipped.is_empty() {
        return Err(MountError::CrossesMount {
            dir: dir.to_owned(),
            skipped,
        });
    }
    std::fs::remove_dir(dir).map_err(|e| MountError::Remove {
        path: dir.to_owned(),
        source: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })
}

struct Walk {
    dev: u64,
    mount_points: Vec<PathBuf>,
    real_root: PathBuf,
}

impl Walk {
    /// Empty the directory open as `fd` (`shown` for messages, `rel` relative to the root).
    fn remove_contents(
        &self,
        fd: &OwnedFd,
        shown: &Path,
        rel: &Path,
        skipped: &mut Vec<PathBuf>,
    ) -> Result<(), MountError> {
        let err = |path: PathBuf| move |source| MountError::Remove { path, source };
        let mut listing = Dir::openat(fd.as_fd(), ".", dir_flags(), Mode::empty())
            .map_err(err(shown.to_owned()))?;
        let names: Vec<Vec<u8>> = listing
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_bytes().to_vec())
            .filter(|n| n != b"." && n != b"..")
            .collect();
        drop(listing);
        for name in names {
            let name_os = OsStr::from_bytes(&name);
            let path = shown.join(name_os);
            let cname = std::ffi::CString::new(name.clone()).expect("dir entries have no NUL");
            let cname: &CStr = &cname;
            let st = match fstatat(fd, cname, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(source) => return Err(err(path)(source)),
            };
            let child_rel = rel.join(name_os);
            if st.st_dev != self.dev || self.mount_points.contains(&self.real_root.join(&child_rel))
            {
                skipped.push(path);
                continue;
            }
            let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
            if !is_dir {
                match unlinkat(fd, cname, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => continue,
                    Err(source) => return Err(err(path)(source)),
                }
            }
            let child = openat(fd, cname, dir_flags(), Mode::empty()).map_err(err(path.clone()))?;
            // Re-check on the open descriptor: the entry may have been swapped meanwhile.
            if fstat(&child).map_err(err(path.clone()))?.st_dev != self.dev {
                skipped.push(path);
                continue;
            }
            let before = skipped.len();
            self.remove_contents(&child, &path, &child_rel, skipped)?;
            drop(child);
            if skipped.len() == before {
                unlinkat(fd, cname, UnlinkatFlags::RemoveDir).map_err(err(path))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
            97 22 0:51 / /apps/procs/a\\040b/rootfs rw,relatime - overlay over\\134lay rw,lowerdir=/x\n\
            garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, Path::new("/"));
        assert_eq!(m[0].fs_type, "ext4");
        assert_eq!(m[1].mount_point, Path::new("/apps/procs/a b/rootfs"));
        assert_eq!(m[1].source, "over\\lay");
        assert_eq!(m[1].parent_id, 22);
        assert_eq!(unescape("a\\011b\\012c\\"), b"a\tb\nc\\");
    }

    #[test]
    fn overlay_lower_dirs_from_mountinfo() {
        let text = "36 35 98:0 / /mnt rw - ext4 /dev/vda rw\n\
            90 25 0:52 / /apps/procs/a\\040b/rootfs rw,relatime - overlay overlay \
            rw,lowerdir=/apps/cache/layers-v1/build-x/root:/apps/cache/layers-v1/image\\:y/root,\
            upperdir=/apps/procs/a/upper,workdir=/apps/procs/a/work\n";
        let lowers = overlay_lowers(&parse_mountinfo(text));
        assert_eq!(
            lowers,
            [
                (
                    PathBuf::from("/apps/procs/a b/rootfs"),
                    PathBuf::from("/apps/cache/layers-v1/build-x/root")
                ),
                (
                    PathBuf::from("/apps/procs/a b/rootfs"),
                    PathBuf::from("/apps/cache/layers-v1/image:y/root")
                ),
            ]
        );
    }

    #[test]
    fn sees_the_root_mount() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(!is_mount_point(Path::new("/no/such/dir")).unwrap());
    }

    #[test]
    fn removes_a_plain_tree_without_following_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("proc");
        std::fs::create_dir_all(tree.join("a/b/c")).unwrap();
        std::fs::write(tree.join("a/b/c/f"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), tree.join("a/link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("keep"), tree.join("flink")).unwrap();
        remove_dir_on_one_fs(&tree).unwrap();
        assert!(!tree.exists());
        assert!(outside.path().join("keep").exists());
        remove_dir_on_one_fs(&tree).unwrap();
    }
}
