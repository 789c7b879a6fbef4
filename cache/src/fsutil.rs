//! Small filesystem primitives the store is built from: atomic small-file writes, fsync of
//! a directory or a whole tree, a one-syscall "touch", and a tree removal that copes with
//! read-only directories (image layers keep their modes, e.g. 0555 dirs).

use std::ffi::CString;
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::StoreError;

/// A random, collision-free-enough name for temp files and ingest dirs: pid for humans
/// reading a leftover, 64 random bits for uniqueness.
pub(crate) fn random_name() -> String {
    format!("{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// Writes `body` to a temp sibling (`.tmp-<random>`, never a name readers look at),
/// fsyncs it and renames it over `path`. Readers see the old or the new file, never a
/// torn one.
pub(crate) fn write_atomic(path: &Path, body: &[u8]) -> Result<(), StoreError> {
    write_atomic_mode(path, body, 0o644)
}

/// [`write_atomic`] for a file only its owner may read (index entries name URLs).
pub(crate) fn write_atomic_private(path: &Path, body: &[u8]) -> Result<(), StoreError> {
    write_atomic_mode(path, body, 0o600)
}

fn write_atomic_mode(path: &Path, body: &[u8], mode: u32) -> Result<(), StoreError> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().expect("store paths have a parent");
    let tmp = dir.join(format!(".tmp-{}", random_name()));
    let result = (|| {
        let mut f = fs_err::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        fs_err::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsync a directory, making the renames done in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    let f = fs_err::File::open(dir)?;
    f.sync_all()?;
    Ok(())
}

/// Threads that fsync a tree at publish. fsyncs of files whose data is already on its
/// way to disk (see vrun's writeback kicks) mostly wait on the journal; several in
/// flight share one journal commit and one device flush.
const FSYNC_THREADS: usize = 8;

/// fsync every regular file and directory under `root` (and `root` itself), on
/// [`FSYNC_THREADS`] threads, directories after what they hold. Unlike `syncfs` this
/// waits only for what is in this tree, not for every dirty page of the filesystem: with
/// another process writing to the same filesystem (the apps, on a shared /apps), a
/// 200 KB build took 3.6 s to publish with syncfs. Symlinks are not followed (their
/// directory's fsync covers them).
pub(crate) fn fsync_tree(root: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let (tx, rx) = crossbeam_channel::bounded::<PathBuf>(1024);
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(p)
    };
    let fsync = |p: &Path| -> Result<(), StoreError> {
        let f = open(p).map_err(|e| StoreError::io("cannot open", p, e))?;
        f.sync_all()
            .map_err(|e| StoreError::io("cannot fsync", p, e))
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..FSYNC_THREADS)
            .map(|_| {
                let rx = rx.clone();
                s.spawn(move || -> Result<(), StoreError> {
                    let mut first = Ok(());
                    for p in rx {
                        if first.is_ok() {
                            first = fsync(&p);
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
            let r = w.join().expect("fsync worker does not panic");
            if result.is_ok() {
                result = r;
            }
        }
        result?;
        // Directories last, deepest first: their entries point at inodes now durable.
        for d in dirs.iter().rev() {
            fsync(d)?;
        }
        Ok(())
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
