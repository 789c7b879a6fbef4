//! Small filesystem primitives the store is built from: atomic small-file writes, fsync of
//! a directory or a whole tree, a one-syscall "touch", and a tree removal that copes with
//! read-only directories (image layers keep their modes, e.g. 0555 dirs).

use std::ffi::CString;
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::StoreError;

/// A random, collision-free-enough name for temp files and ingest dirs: pid for humans
/// reading a leftover, 64 random bits for uniqueness.
pub(crate) fn random_name() -> String {
    format!("{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// Remove the temp siblings [`write_atomic`] left in `dir` when its process was killed
/// between creating and renaming them (`.tmp-<pid>-<16 hex>` whose pid no longer runs);
/// a live writer's temp is left alone. Returns how many were removed. A crashed setup's
/// leftovers in a proc's upper dir would otherwise show in the container's `/`.
pub fn remove_stale_temps(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".tmp-")) else {
            continue;
        };
        let Some((pid, random)) = rest.split_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if random.len() != 16 || !random.bytes().all(|b| b.is_ascii_hexdigit()) || pid <= 0 {
            continue;
        }
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The one atomic small-file write of vrun and its store: `body` goes to a new temp
/// sibling (`.tmp-<pid>-<random>`, created exclusively, never a name readers look at),
/// is given `owner` and exactly `mode` (whatever the umask), fsynced, and renamed over
/// `path`.
///
/// Guarantee: readers see the old file or the new one, never a torn one, and the new
/// content is on disk before it replaces the old (so a crash cannot leave an empty or
/// partial file under `path`). The rename itself is durable once the caller fsyncs the
/// directory ([`fsync_dir`] in the store; `envfiles::write_files` does it for its three),
/// which lets a caller writing several files in one directory pay that once. On error
/// the temp file is removed and `path` is untouched; the error is the bare io error, for
/// the caller to name `path`.
pub fn write_atomic(
    path: &Path,
    body: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(".tmp-{}", random_name()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(body)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] of a store file anyone may read.
pub(crate) fn write_store_file(path: &Path, body: &[u8]) -> Result<(), StoreError> {
    write_atomic(path, body, 0o644, None).map_err(|e| StoreError::io("write", path, e))
}

/// [`write_atomic`] of a store file only its owner may read (index entries name URLs).
pub(crate) fn write_store_file_private(path: &Path, body: &[u8]) -> Result<(), StoreError> {
    write_atomic(path, body, 0o600, None).map_err(|e| StoreError::io("write", path, e))
}

/// fsync a directory, making the renames done in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    let f = fs_err::File::open(dir)?;
    f.sync_all()?;
    Ok(())
}

/// Threads that write a tree back at publish (several requests in flight keep the disk's
/// queue full; the waits are for I/O, not CPU).
const SYNC_THREADS: usize = 8;

/// How [`sync_tree`] makes a tree durable on the filesystem it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Nothing survives a reboot anyway (tmpfs, ramfs): nothing to do.
    Volatile,
    /// ext4, xfs: one journal. Every file's data is written and waited for with
    /// `sync_file_range` (its pages only: no journal commit, no device flush each), and
    /// the caller's next `fsync` of an inode changed after that (`layer.json`) commits the
    /// journal up to there: every inode, allocation and directory entry of the tree.
    /// That is the metadata half of what `syncfs` did, without anyone else's data.
    Journal,
    /// Anything else (btrfs logs per inode, unknown filesystems): fsync every file and
    /// directory, which is correct everywhere and slow with many files.
    EachFile,
}

/// The strategy for the filesystem holding `path` (by `statfs` magic).
pub(crate) fn durability(path: &Path) -> Durability {
    let c = match CString::new(path.as_os_str().as_bytes()) {
        Ok(c) => c,
        Err(_) => return Durability::EachFile,
    };
    // SAFETY: statfs on a valid NUL-terminated path into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Durability::EachFile;
    }
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const TMPFS: i64 = 0x0102_1994;
    const RAMFS: i64 = 0x8584_58f6;
    match st.f_type as i64 {
        TMPFS | RAMFS => Durability::Volatile,
        EXT4 | XFS => Durability::Journal,
        _ => Durability::EachFile,
    }
}

/// Write back every regular file under `root` and make the tree durable as
/// [`Durability`] says for its filesystem; with [`Durability::Journal`] the caller must
/// fsync something written after this returns (publish fsyncs `layer.json`). Unlike
/// `syncfs` this waits only for what is in this tree: with another process writing to
/// the same filesystem (the apps, on a shared /apps), a 200 KB build took 3.6 s to
/// publish with syncfs (issue 14; `cargo bench -p vrun-cache --bench publish`).
/// Symlinks are not followed (their directory covers them).
pub(crate) fn sync_tree(root: &Path) -> Result<Durability, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let how = durability(root);
    if how == Durability::Volatile {
        return Ok(how);
    }
    let (tx, rx) = crossbeam_channel::bounded::<PathBuf>(1024);
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(p)
            .map_err(|e| StoreError::io("cannot open", p, e))
    };
    let fsync = |p: &Path| -> Result<(), StoreError> {
        open(p)?
            .sync_all()
            .map_err(|e| StoreError::io("cannot fsync", p, e))
    };
    let write_back = |p: &Path| -> Result<(), StoreError> {
        if how == Durability::EachFile {
            return fsync(p);
        }
        let f = open(p)?;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: plain syscall on a valid open fd.
        if unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) } != 0 {
            return Err(StoreError::io(
                "cannot write back",
                p,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..SYNC_THREADS)
            .map(|_| {
                let rx = rx.clone();
                s.spawn(move || -> Result<(), StoreError> {
                    let mut first = Ok(());
                    for p in rx {
                        if first.is_ok() {
                            first = write_back(&p);
                        }
                    }
                    first
                })
            })
            .collect();
        drop(rx);
        // Walk on this thread; files go to the workers as they are found.
        let mut dirs = vec![root.to_path_buf()];
        let mut i = 0;
        let mut walked = Ok(());
        while i < dirs.len() {
            let entries = match std::fs::read_dir(&dirs[i]) {
                Ok(e) => e,
                Err(e) => {
                    walked = Err(StoreError::io("cannot read", &dirs[i], e));
                    break;
                }
            };
            for entry in entries.flatten() {
                match entry.file_type() {
                    Ok(t) if t.is_dir() => dirs.push(entry.path()),
                    Ok(t) if t.is_file() => {
                        let _ = tx.send(entry.path());
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        drop(tx);
        let mut result = walked;
        for w in workers {
            let r = w.join().expect("sync worker does not panic");
            if result.is_ok() {
                result = r;
            }
        }
        result?;
        if how == Durability::EachFile {
            // Directories last, deepest first: their entries point at durable inodes.
            for d in dirs.iter().rev() {
                fsync(d)?;
            }
        }
        Ok(how)
    })
}

/// Sets the modification time of `path` (not following symlinks) to now: how the store
/// records "last used" for gc, in one syscall and without writing data.
pub(crate) fn touch(path: &Path) -> Result<(), StoreError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| {
        StoreError::io(
            "cannot touch",
            path,
            std::io::Error::new(ErrorKind::InvalidInput, e),
        )
    })?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: valid NUL-terminated path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(StoreError::io(
            "cannot touch",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Modification time of `path` without following symlinks (epoch when unreadable).
pub(crate) fn mtime(path: &Path) -> SystemTime {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Removes a file or a whole tree. When plain removal is refused (a read-only directory
/// as a non-root user), makes directories writable and tries again. Missing is success.
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_dirs_writable(path);
            std::fs::remove_dir_all(path)
        }
    }
}

fn make_dirs_writable(dir: &Path) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                make_dirs_writable(&entry.path());
            }
        }
    }
}

/// Disk usage of a file or tree (allocated blocks, not following symlinks).
pub(crate) fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                total += disk_usage(&entry.path());
            }
        }
    }
    total
}

/// `true` when `s` is exactly `len` lowercase hex digits (a digest we may use as a name).
pub(crate) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The names in a directory, sorted; a missing directory is empty.
pub(crate) fn sorted_names(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let entries = match fs_err::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str() {
            names.push((name.to_owned(), entry.path()));
        }
    }
    names.sort();
    Ok(names)
}

pub(crate) fn check_hex(what: &'static str, value: &str, len: usize) -> Result<(), StoreError> {
    if is_hex(value, len) {
        Ok(())
    } else {
        Err(StoreError::BadDigest {
            what,
            value: value.to_owned(),
            expected: if len == 64 {
                "64 lowercase hex digits"
            } else {
                "32 lowercase hex digits"
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temps_of_dead_writers_go_and_live_ones_stay() {
        let dir = std::env::temp_dir().join(format!("vrun-stale-{}", random_name()));
        std::fs::create_dir(&dir).unwrap();
        // pid 4194304 is above the kernel's largest pid_max: never a live process.
        let dead = dir.join(".tmp-4194304-0123456789abcdef");
        let live = dir.join(format!(".tmp-{}-0123456789abcdef", std::process::id()));
        let other = dir.join(".tmp-notours");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(&dir).unwrap(), 1);
        assert!(!dead.exists() && live.exists() && other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
