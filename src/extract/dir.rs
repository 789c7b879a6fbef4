//! The directory sink: planned entries made real under a staging directory.
//!
//! This is the half of extraction that touches the filesystem. [`policy`](super::policy)
//! has already decided what each entry is allowed to be; this sink decides nothing about
//! names, links, modes or owners, it only makes them, safely: every path is resolved
//! inside the root through `O_NOFOLLOW` fds (`tree`), regular files go to the writer
//! pool (`writer`), directory modes and mtimes are applied at the end, deepest first, and
//! the free-space reserve is checked as bytes are handed on (see the `extract` note).
//! The other sink, [`super::ErofsSink`] (one EROFS image), implements the same [`Sink`]
//! and shares none of this: it resolves paths against the image it writes.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::policy::{reject, Planned, RelPath, What};
use super::tree::{self, cstring, Dir, Owner, ResolveError, Tree};
use super::writer::{xattr_error, FileMeta, Key, Pool, Writers, SMALL_FILE};
use super::{io_error, ExtractError, Limits, Mode, Sink};
use crate::tar::Mtime;

/// Free space is re-checked at least every time this many bytes have been handed on.
const SPACE_CHECK_EVERY: u64 = 64 * 1024 * 1024;

/// A directory whose mode and mtime are applied at the end.
struct DirMeta {
    path: RelPath,
    ino: u64,
    perm: u32,
    mtime: Mtime,
}

/// The free-space reserve of the destination filesystem (see the module note).
struct Space {
    root: Arc<Dir>,
    dest: PathBuf,
    reserve: u64,
    /// Bytes of file data handed on for writing so far.
    handed: u64,
    next_check: u64,
}

impl Space {
    /// `upcoming` bytes are about to be handed on; `queued` are handed on, not yet written.
    fn check(&mut self, upcoming: u64, queued: u64) -> Result<(), ExtractError> {
        self.handed += upcoming;
        if self.reserve == 0 || self.handed < self.next_check {
            return Ok(());
        }
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: fstatvfs(2) on our root fd fills the struct on success.
        let rc = unsafe { libc::fstatvfs(self.root.fd.as_raw_fd(), st.as_mut_ptr()) };
        if rc != 0 {
            return Ok(()); // Not knowing is not a reason to fail; ENOSPC still is.
        }
        // SAFETY: initialized by the successful call.
        let st = unsafe { st.assume_init() };
        let free = st.f_bavail * st.f_frsize;
        let need = self.reserve + queued + upcoming;
        if free < need {
            return Err(ExtractError::NoSpace {
                path: self.dest.clone(),
                free,
                reserve: self.reserve,
            });
        }
        self.next_check = self.handed + ((free - need) / 2).min(SPACE_CHECK_EVERY);
        Ok(())
    }
}

/// Writes entries under an existing, empty staging directory.
pub struct DirSink {
    tree: Tree,
    me: Owner,
    pool: Pool,
    space: Space,
    dirs: Vec<DirMeta>,
    /// Names we made directories (so a later non-directory knows to remove them).
    known_dirs: HashSet<Key>,
    /// Names we made symlinks or hard links. The directory cache may hold paths resolved
    /// through such a name (images follow symlinks), so replacing one flushes the cache.
    links: HashSet<Key>,
}

impl DirSink {
    /// A sink writing under `dest` (existing and empty) with `writers` file writers.
    pub fn open(
        dest: &Path,
        mode: Mode,
        limits: &Limits,
        writers: Writers,
    ) -> Result<DirSink, ExtractError> {
        let dest_err = |source| ExtractError::Dest {
            path: dest.to_path_buf(),
            source,
        };
        // SAFETY: geteuid/getegid cannot fail.
        let me = unsafe {
            Owner {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        };
        let (follow, implicit_owner) = match mode {
            Mode::Build { uid, gid } => (false, Some(Owner { uid, gid })),
            Mode::Image => (true, None),
        };
        let implicit_owner = implicit_owner.filter(|o| (o.uid, o.gid) != (me.uid, me.gid));
        let tree = Tree::open(dest, follow, implicit_owner).map_err(dest_err)?;
        let pool = Pool::new(writers).map_err(dest_err)?;
        let space = Space {
            root: tree.root().clone(),
            dest: dest.to_path_buf(),
            reserve: limits.min_free_bytes,
            handed: 0,
            next_check: 0,
        };
        Ok(DirSink {
            tree,
            me,
            pool,
            space,
            dirs: Vec::new(),
            known_dirs: HashSet::new(),
            links: HashSet::new(),
        })
    }
}

impl Sink for DirSink {
    fn begin(&mut self) -> Result<(), ExtractError> {
        self.space.check(0, 0)
    }

    fn file(&mut self, p: &Planned, data: &mut dyn Read) -> Result<(), ExtractError> {
        self.write_file(p, data)
    }

    fn dir(&mut self, p: &Planned) -> Result<(), ExtractError> {
        self.directory(p)
    }

    fn symlink(&mut self, p: &Planned) -> Result<(), ExtractError> {
        self.make_symlink(p)
    }

    fn hardlink(&mut self, p: &Planned) -> Result<(), ExtractError> {
        self.make_hardlink(p)
    }

    fn finish(&mut self) -> Result<Option<Instant>, ExtractError> {
        self.pool.finish()?;
        self.apply_dir_metadata()?;
        Ok(self.pool.first_file_done)
    }

    fn abort(&mut self) {
        self.pool.abort();
    }
}

impl DirSink {
    fn owner_for(&self, p: &Planned) -> Option<Owner> {
        let (uid, gid) = p.owner;
        ((uid, gid) != (self.me.uid, self.me.gid)).then_some(Owner { uid, gid })
    }

    fn xattrs(&self, p: &Planned) -> Result<Vec<(CString, Vec<u8>)>, ExtractError> {
        p.xattrs
            .iter()
            .map(|(n, v)| {
                cstring(n)
                    .map(|n| (n, v.clone()))
                    .map_err(|e| io_error(&p.entry, "name an extended attribute", e))
            })
            .collect()
    }

    fn parent(&mut self, p: &Planned) -> Result<(Arc<Dir>, CString, Key), ExtractError> {
        let Some((parent, name)) = p.path.split_last() else {
            return Err(reject(&p.entry, "entry has an empty name"));
        };
        let dir = self
            .tree
            .dir(&parent, true)
            .map_err(|e| resolve_err(&p.entry, e))?;
        self.known_dirs.extend(self.tree.take_created());
        let cname = cstring(name).map_err(|e| io_error(&p.entry, "name", e))?;
        let key: Key = (dir.ino, name.into());
        self.pool.settle(&key)?;
        Ok((dir, cname, key))
    }

    /// Make room for a new entry at `name`: remove a directory we made there earlier
    /// (a later entry wins). Non-directories are replaced by the creating call itself.
    fn clear_dir_at(
        &mut self,
        dir: &Dir,
        name: &CString,
        key: &Key,
        entry: &str,
    ) -> Result<(), ExtractError> {
        self.forget_link(key);
        if !self.known_dirs.contains(key) {
            return Ok(());
        }
        self.pool.drain()?;
        tree::remove_any(dir.fd.as_fd(), name)
            .map_err(|e| io_error(entry, "replace directory", e))?;
        self.tree.flush();
        self.known_dirs.remove(key);
        Ok(())
    }

    /// A new entry replaces whatever is at `key`: if that was a symlink we made, no cached
    /// directory may still be reached through it.
    fn forget_link(&mut self, key: &Key) {
        if self.links.remove(key) {
            self.tree.flush();
        }
    }

    fn write_file(&mut self, p: &Planned, data: &mut dyn Read) -> Result<(), ExtractError> {
        let What::File {
            size,
            data_len,
            ref sparse,
        } = p.what
        else {
            unreachable!("file() is only called for files");
        };
        let upcoming = if data_len <= SMALL_FILE && sparse.is_none() {
            data_len
        } else {
            0
        };
        self.space.check(upcoming, self.pool.queued())?;
        let (dir, name, key) = self.parent(p)?;
        let replaces_link = self.links.contains(&key);
        self.clear_dir_at(&dir, &name, &key, &p.entry)?;
        let meta = FileMeta {
            dir,
            name,
            perm: p.perm,
            chown: self.owner_for(p),
            mtime: p.mtime,
            size: data_len,
            xattrs: self.xattrs(p)?,
            entry: p.entry.clone(),
        };
        let space = &mut self.space;
        let mut reserve = |n, queued| space.check(n, queued);
        match sparse {
            Some(segments) => {
                self.pool.settle(&key)?;
                self.pool
                    .sparse_file(meta, segments, size, data, &mut reserve)?;
            }
            None => self.pool.file(meta, key, data, &mut reserve)?,
        }
        if replaces_link {
            // The writer replaces the link; until it has, a walk would still follow it.
            self.pool.drain()?;
            self.tree.flush();
        }
        Ok(())
    }

    fn directory(&mut self, p: &Planned) -> Result<(), ExtractError> {
        let xattrs = self.xattrs(p)?;
        let set_xattrs = |fd: std::os::fd::BorrowedFd<'_>| {
            for (n, v) in &xattrs {
                tree::fsetxattr(fd, n, v).map_err(|e| xattr_error(&p.entry, n, e))?;
            }
            Ok::<(), ExtractError>(())
        };
        if p.path.is_root() {
            let root = self.tree.root().clone();
            let fd = tree::reopen_dir(&root).map_err(|e| io_error(&p.entry, "open", e))?;
            if let Some(o) = self.owner_for(p) {
                tree::fchown(fd.as_fd(), o.uid, o.gid)
                    .map_err(|e| io_error(&p.entry, "chown", e))?;
            }
            set_xattrs(fd.as_fd())?;
            self.dirs.push(DirMeta {
                path: p.path.clone(),
                ino: root.ino,
                perm: p.perm,
                mtime: p.mtime,
            });
            return Ok(());
        }
        let (dir, name, key) = self.parent(p)?;
        self.forget_link(&key);
        let fd = dir.fd.as_fd();
        loop {
            match tree::mkdirat(fd, &name, 0o700) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    let st = tree::fstatat(fd, &name).map_err(|e| io_error(&p.entry, "stat", e))?;
                    if tree::is_dir(&st) {
                        break; // merge: the later entry's metadata wins
                    }
                    tree::unlinkat(fd, &name, false)
                        .map_err(|e| io_error(&p.entry, "replace", e))?;
                }
                Err(e) => return Err(io_error(&p.entry, "create directory", e)),
            }
        }
        if let Some(o) = self.owner_for(p) {
            tree::fchownat(fd, &name, o.uid, o.gid).map_err(|e| io_error(&p.entry, "chown", e))?;
        }
        let opened =
            tree::open_dir_nofollow(fd, &name).map_err(|e| io_error(&p.entry, "open", e))?;
        if !xattrs.is_empty() {
            let rw = tree::reopen_dir(&opened).map_err(|e| io_error(&p.entry, "open", e))?;
            set_xattrs(rw.as_fd())?;
        }
        self.dirs.push(DirMeta {
            path: p.path.clone(),
            ino: opened.ino,
            perm: p.perm,
            mtime: p.mtime,
        });
        self.known_dirs.insert(key);
        Ok(())
    }

    fn make_symlink(&mut self, p: &Planned) -> Result<(), ExtractError> {
        let What::Symlink { target } = &p.what else {
            unreachable!("symlink() is only called for symlinks");
        };
        let ctarget = cstring(target).map_err(|e| io_error(&p.entry, "read link target", e))?;
        let xattrs = self.xattrs(p)?;
        let (dir, name, key) = self.parent(p)?;
        self.clear_dir_at(&dir, &name, &key, &p.entry)?;
        let fd = dir.fd.as_fd();
        if let Err(e) = tree::symlinkat(&ctarget, fd, &name) {
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io_error(&p.entry, "create symlink", e));
            }
            tree::unlinkat(fd, &name, false).map_err(|e| io_error(&p.entry, "replace", e))?;
            tree::symlinkat(&ctarget, fd, &name)
                .map_err(|e| io_error(&p.entry, "create symlink", e))?;
        }
        if let Some(o) = self.owner_for(p) {
            tree::fchownat(fd, &name, o.uid, o.gid).map_err(|e| io_error(&p.entry, "chown", e))?;
        }
        for (n, v) in &xattrs {
            tree::lsetxattr_at(fd, &name, n, v).map_err(|e| xattr_error(&p.entry, n, e))?;
        }
        tree::utimensat_nofollow(fd, &name, p.mtime)
            .map_err(|e| io_error(&p.entry, "set mtime of", e))?;
        self.links.insert(key);
        Ok(())
    }

    fn make_hardlink(&mut self, p: &Planned) -> Result<(), ExtractError> {
        let What::HardLink { target, shown } = &p.what else {
            unreachable!("hardlink() is only called for hard links");
        };
        let Some((tparent, tname)) = target.split_last() else {
            return Err(reject(&p.entry, "hard link with an empty target"));
        };
        let tdir = self.tree.dir(&tparent, false).map_err(|e| match e {
            ResolveError::Io(_, _, ref io) if io.kind() == io::ErrorKind::NotFound => reject(
                &p.entry,
                &format!("hard link target `{shown}` does not exist"),
            ),
            e => resolve_err(&p.entry, e),
        })?;
        let tname_c = cstring(tname).map_err(|e| io_error(&p.entry, "name", e))?;
        self.pool.settle(&(tdir.ino, tname.into()))?;
        let (dir, name, key) = self.parent(p)?;
        self.clear_dir_at(&dir, &name, &key, &p.entry)?;
        let link = |name: &CString| tree::linkat(tdir.fd.as_fd(), &tname_c, dir.fd.as_fd(), name);
        let mut result = link(&name);
        if result
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EEXIST))
        {
            tree::unlinkat(dir.fd.as_fd(), &name, false)
                .map_err(|e| io_error(&p.entry, "replace", e))?;
            result = link(&name);
        }
        result.map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => reject(
                &p.entry,
                &format!("hard link target `{shown}` does not exist"),
            ),
            Some(libc::EPERM) => reject(
                &p.entry,
                &format!("hard link target `{shown}` is a directory"),
            ),
            _ => io_error(&p.entry, "create hard link", e),
        })?;
        self.links.insert(key);
        Ok(())
    }

    /// Directory modes and mtimes, deepest first, each through an `O_NOFOLLOW` fd and only
    /// if the path still names the directory we made (a later entry may have replaced it).
    fn apply_dir_metadata(&mut self) -> Result<(), ExtractError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.path.depth()));
        for d in dirs {
            let entry = String::from_utf8_lossy(d.path.as_bytes()).into_owned();
            let Ok(dir) = self.tree.dir(&d.path, false) else {
                continue;
            };
            if dir.ino != d.ino {
                continue;
            }
            let fd = tree::reopen_dir(&dir).map_err(|e| io_error(&entry, "open", e))?;
            tree::fchmod(fd.as_fd(), d.perm).map_err(|e| io_error(&entry, "chmod", e))?;
            tree::futimens(fd.as_fd(), d.mtime).map_err(|e| io_error(&entry, "set mtime of", e))?;
        }
        Ok(())
    }
}

pub(super) fn resolve_err(entry: &str, e: ResolveError) -> ExtractError {
    match e {
        ResolveError::Io(op, _, source) => ExtractError::Io {
            entry: entry.to_string(),
            op,
            source,
        },
        e => reject(entry, &e.to_string()),
    }
}
