//! The extraction root and every system call made inside it.
//!
//! All file system work goes through directory file descriptors obtained by walking from
//! the root fd one component at a time with `O_NOFOLLOW`, so no path string is ever handed
//! to the kernel whole and no symlink is followed by accident:
//!
//! - a component that is a symlink is an error in builds, and in images is read and resolved
//!   by us *inside the root* (absolute targets restart at the root, `..` stops at the root),
//!   like `openat2(RESOLVE_IN_ROOT)` but also able to create missing directories on the way;
//! - the final component is only ever touched with `*at` calls that do not follow it
//!   (`O_CREAT|O_EXCL|O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `linkat` without
//!   `AT_SYMLINK_FOLLOW`), or through an fd opened with `O_NOFOLLOW`.
//!
//! Resolved directories are cached by their normalized archive path (archives list a
//! directory's files together, so most entries hit the cache and cost no walk). Anything
//! that removes a directory clears the cache. Each cached fd also carries its inode number,
//! which names "this directory" independently of the path used to reach it (images may
//! reach one directory through several symlinked paths).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use crate::tar::Mtime;

use super::policy::RelPath;

/// Symlinks followed while resolving one path before giving up (Linux's own limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// Cached directory fds before the cache is flushed; well under the default 1024-fd limit.
const DIR_CACHE_MAX: usize = 256;

/// Goes on through a symlink's `target` inside the root: an absolute target restarts at
/// the root (`stack` cleared), and its components are walked before the rest (`todo` is
/// popped from the end). Shared with the EROFS sink's resolver, which walks its own tree.
pub(super) fn follow_link<T>(target: &[u8], stack: &mut Vec<T>, todo: &mut Vec<Vec<u8>>) {
    if target.starts_with(b"/") {
        stack.clear();
    }
    todo.extend(
        target
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(<[u8]>::to_vec),
    );
}

/// An open directory inside the root.
#[derive(Debug)]
pub struct Dir {
    pub fd: OwnedFd,
    pub ino: u64,
}

/// Why a path could not be resolved.
#[derive(Debug)]
pub enum ResolveError {
    /// A component is a symlink and the mode does not traverse symlinks.
    Symlink(Vec<u8>),
    /// A component exists but is not a directory.
    NotDir(Vec<u8>),
    /// Too many symlinks (a loop).
    Loop,
    Io(&'static str, Vec<u8>, io::Error),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::Symlink(c) => write!(
                f,
                "path goes through symlink `{}` (not allowed in a build)",
                String::from_utf8_lossy(c)
            ),
            ResolveError::NotDir(c) => write!(
                f,
                "path goes through `{}`, which is not a directory",
                String::from_utf8_lossy(c)
            ),
            ResolveError::Loop => write!(f, "too many levels of symlinks in path"),
            ResolveError::Io(op, c, e) => {
                write!(f, "cannot {op} `{}`: {e}", String::from_utf8_lossy(c))
            }
        }
    }
}

/// Owner of directories created implicitly (parents not listed in the archive).
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The extraction root.
pub struct Tree {
    root: Arc<Dir>,
    follow_symlinks: bool,
    implicit_owner: Option<Owner>,
    cache: HashMap<Vec<u8>, Arc<Dir>>,
    /// Directories made implicitly since the last [`Tree::take_created`], as
    /// (parent inode, name).
    created: Vec<(u64, Box<[u8]>)>,
}

impl Tree {
    pub fn open(
        dest: &Path,
        follow_symlinks: bool,
        implicit_owner: Option<Owner>,
    ) -> io::Result<Tree> {
        let c = CString::new(dest.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: plain open(2) of a NUL-terminated path; the fd is owned on success.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        let fd = owned(fd)?;
        let ino = fstat(fd.as_fd())?.st_ino;
        Ok(Tree {
            root: Arc::new(Dir { fd, ino }),
            follow_symlinks,
            implicit_owner,
            cache: HashMap::new(),
            created: Vec::new(),
        })
    }

    pub fn root(&self) -> &Arc<Dir> {
        &self.root
    }

    /// Forget every cached directory (after a directory was removed).
    pub fn flush(&mut self) {
        self.cache.clear();
    }

    /// The directory at `path`, creating missing ones (mode 0755, owned by the implicit
    /// owner) when `create`.
    pub fn dir(&mut self, path: &RelPath, create: bool) -> Result<Arc<Dir>, ResolveError> {
        if path.is_root() {
            return Ok(self.root.clone());
        }
        if let Some(d) = self.cache.get(path.as_bytes()) {
            return Ok(d.clone());
        }
        let dir = Arc::new(self.walk(path, create)?);
        if self.cache.len() >= DIR_CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(path.as_bytes().to_vec(), dir.clone());
        Ok(dir)
    }

    /// Directories made implicitly by [`Tree::dir`] since the last call.
    pub fn take_created(&mut self) -> Vec<(u64, Box<[u8]>)> {
        std::mem::take(&mut self.created)
    }

    fn walk(&mut self, path: &RelPath, create: bool) -> Result<Dir, ResolveError> {
        // Stack of open directories from the root; `..` pops, never below the root.
        let mut stack: Vec<Dir> = Vec::new();
        let mut todo: Vec<Vec<u8>> = path.components().rev().map(<[u8]>::to_vec).collect();
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            match comp.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    stack.pop();
                    continue;
                }
                _ => {}
            }
            let name = cstring(&comp).map_err(|e| ResolveError::Io("open", comp.clone(), e))?;
            let cur = stack.last().map_or(self.root.fd.as_fd(), |d| d.fd.as_fd());
            match open_dir_nofollow(cur, &name) {
                Ok(d) => {
                    stack.push(d);
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    match mkdirat(cur, &name, 0o755) {
                        Ok(()) => {
                            let parent_ino = stack.last().map_or(self.root.ino, |d| d.ino);
                            self.created.push((parent_ino, comp.clone().into()));
                            if let Some(o) = self.implicit_owner {
                                fchownat(cur, &name, o.uid, o.gid)
                                    .map_err(|e| ResolveError::Io("chown", comp.clone(), e))?;
                            }
                            let d = open_dir_nofollow(cur, &name)
                                .map_err(|e| ResolveError::Io("open", comp.clone(), e))?;
                            // mkdir's mode went through the umask; make it 0755 exactly.
                            let rw = reopen_dir(&d)
                                .map_err(|e| ResolveError::Io("open", comp.clone(), e))?;
                            fchmod(rw.as_fd(), 0o755)
                                .map_err(|e| ResolveError::Io("chmod", comp.clone(), e))?;
                            stack.push(d);
                            continue;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                            todo.push(comp);
                            continue;
                        }
                        Err(e) => return Err(ResolveError::Io("create directory", comp, e)),
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
                    let st = fstatat(cur, &name)
                        .map_err(|e| ResolveError::Io("stat", comp.clone(), e))?;
                    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                        return Err(ResolveError::NotDir(comp));
                    }
                    if !self.follow_symlinks {
                        return Err(ResolveError::Symlink(comp));
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(ResolveError::Loop);
                    }
                    let target = readlinkat(cur, &name)
                        .map_err(|e| ResolveError::Io("read symlink", comp.clone(), e))?;
                    follow_link(&target, &mut stack, &mut todo);
                }
                Err(e) => return Err(ResolveError::Io("open", comp, e)),
            }
        }
        match stack.pop() {
            Some(d) => Ok(d),
            None => Ok(Dir {
                fd: dup(self.root.fd.as_fd())
                    .map_err(|e| ResolveError::Io("open", Vec::new(), e))?,
                ino: self.root.ino,
            }),
        }
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// `O_PATH` fd of the directory `name` in `dir`, refusing to follow a symlink.
pub fn open_dir_nofollow(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Dir> {
    // SAFETY: openat(2) with a valid dirfd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    let fd = owned(fd)?;
    let st = fstat(fd.as_fd())?;
    // O_PATH|O_NOFOLLOW may open a symlink itself; O_DIRECTORY should refuse it, but check.
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    Ok(Dir { fd, ino: st.st_ino })
}

/// A readable fd for an `O_PATH` directory fd (needed for fchmod/futimens/fchown).
pub fn reopen_dir(d: &Dir) -> io::Result<OwnedFd> {
    // SAFETY: openat(2) of "." relative to a directory fd.
    let fd = unsafe {
        libc::openat(
            d.fd.as_raw_fd(),
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    owned(fd)
}

/// Create `name` in `dir` for writing; fails if anything (even a symlink) is there.
pub fn create_file(dir: BorrowedFd<'_>, name: &CStr, perm: u32) -> io::Result<OwnedFd> {
    // SAFETY: openat(2) with a valid dirfd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            perm as libc::c_uint,
        )
    };
    owned(fd)
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, perm: u32) -> io::Result<()> {
    // SAFETY: mkdirat(2) with a valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), perm as libc::mode_t) })
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: symlinkat(2) with NUL-terminated strings and a valid dirfd.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

/// Hard link without following a symlink at the source (links the symlink itself).
pub fn linkat(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
) -> io::Result<()> {
    // SAFETY: linkat(2) with valid dirfds and NUL-terminated names; flags 0 = no follow.
    cvt(unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            0,
        )
    })
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: unlinkat(2) with a valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// chown of `name` itself, never of what it points to.
pub fn fchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchownat(2) with AT_SYMLINK_NOFOLLOW, a valid dirfd and NUL-terminated name.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchown(2) on an fd we own.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })
}

pub fn fchmod(fd: BorrowedFd<'_>, perm: u32) -> io::Result<()> {
    // SAFETY: fchmod(2) on an fd we own.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), perm as libc::mode_t) })
}

fn times(mtime: Mtime) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime.secs as libc::time_t,
            tv_nsec: mtime.nanos.into(),
        },
    ]
}

/// Set the modification time (access time left alone).
pub fn futimens(fd: BorrowedFd<'_>, mtime: Mtime) -> io::Result<()> {
    let t = times(mtime);
    // SAFETY: futimens(2) on an fd we own with a 2-element timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) })
}

/// Set the modification time of `name` itself (a symlink is not followed).
pub fn utimensat_nofollow(dir: BorrowedFd<'_>, name: &CStr, mtime: Mtime) -> io::Result<()> {
    let t = times(mtime);
    // SAFETY: utimensat(2) with a valid dirfd, NUL-terminated name, 2-element array.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Set an extended attribute on an open file or directory.
pub fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: fsetxattr(2) reads `value.len()` bytes from `value` and a NUL-terminated name.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// Set an extended attribute on `name` in `dir` itself (a symlink is not followed). There
/// is no `lsetxattrat`; the directory is reached through its `/proc/self/fd` link.
pub fn lsetxattr_at(dir: BorrowedFd<'_>, name: &CStr, key: &CStr, value: &[u8]) -> io::Result<()> {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    let path = cstring(&path)?;
    // SAFETY: lsetxattr(2) with NUL-terminated path and name, `value.len()` bytes of value.
    cvt(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat(2) fills the struct on success.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialized by the successful call.
    Ok(unsafe { st.assume_init() })
}

/// lstat of `name` in `dir`.
pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstatat(2) with AT_SYMLINK_NOFOLLOW fills the struct on success.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: initialized by the successful call.
    Ok(unsafe { st.assume_init() })
}

pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: readlinkat(2) writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Remove `name` in `dir` whatever it is; a directory with everything below it. Never
/// follows a symlink: directories are opened with `O_NOFOLLOW` and listed through their fd.
pub fn remove_any(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let st = match fstatat(dir, name) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !is_dir(&st) {
        return unlinkat(dir, name, false);
    }
    let sub = open_dir_nofollow(dir, name)?;
    let listing = std::fs::read_dir(format!("/proc/self/fd/{}", sub.fd.as_raw_fd()))?;
    for child in listing {
        let child = child?;
        let cname = cstring(child.file_name().as_encoded_bytes())?;
        remove_any(sub.fd.as_fd(), &cname)?;
    }
    unlinkat(dir, name, true)
}
