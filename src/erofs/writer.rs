//! The streaming image writer: entries in archive order in, one EROFS image out.
//!
//! See the module note of [`crate::erofs`] for the layout and why.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self, InodeFields, Superblock, Xattr, BLOCK, NID_UNIT};

/// Copy buffer for file data, and the write buffer in front of the image: large enough that
/// a big file costs one `write` per 256 KiB, small enough to be irrelevant for memory.
const IO_BUF: usize = 256 * 1024;

/// The root inode sits in block 0 right after the superblock (meta_blkaddr is 0), so its
/// nid, which the superblock stores in 16 bits, is always 36 whatever the image size.
const ROOT_OFFSET: u64 = format::SUPER_OFFSET + format::SUPER_SIZE as u64;
const ROOT_NID: u64 = ROOT_OFFSET / NID_UNIT;

/// Longest symlink target Linux accepts (`PATH_MAX` less the NUL).
pub const SYMLINK_MAX: usize = 4095;

/// Distinct xattrs remembered to detect a repeat (which then goes to the shared area).
/// Bounds the memory an archive with a unique xattr on every file can cost.
const XATTR_SEEN_MAX: usize = 4096;

/// Sentinel nid of an inode whose record is still in the open slab.
const PENDING: u64 = u64::MAX;

/// Metadata of one entry. `mode` carries the 12 permission bits (setuid, setgid, sticky,
/// rwx ×3); the file type comes from the [`EntryKind`]. Xattrs are full names
/// (`user.foo`, `security.capability`, `trusted.x`, `system.posix_acl_access`) and values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A run of data in a sparse file: `len` bytes at logical `offset`. Everything else reads
/// as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// What an entry is. Data of files is passed separately as a reader.
#[derive(Debug, Clone, Copy)]
pub enum EntryKind<'a> {
    Directory,
    /// A regular file whose reader yields exactly `size` bytes.
    File {
        size: u64,
    },
    /// A regular file of `size` bytes whose reader yields the bytes of `extents`
    /// (sorted, non-overlapping) one after the other; the rest are holes.
    SparseFile {
        size: u64,
        extents: &'a [Extent],
    },
    Symlink {
        target: &'a [u8],
    },
    /// Another name for the inode at `target` (a path like any other). The entry's own
    /// metadata is not used: a hard link shares its inode's.
    HardLink {
        target: &'a [u8],
    },
    Fifo,
    Socket,
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
}

/// One resolved entry: a path relative to the root (`/`-separated, empty for the root
/// itself), what it is, and its metadata.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub path: &'a [u8],
    pub kind: EntryKind<'a>,
    pub meta: &'a Metadata,
}

/// Why an entry cannot go into an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("empty path component (a leading, trailing or doubled '/')")]
    EmptyComponent,
    #[error("path component `.` or `..`")]
    DotComponent,
    #[error("NUL byte in the path")]
    Nul,
    #[error("name is {0} bytes, the limit is 255")]
    NameTooLong(usize),
    #[error("{0} is not a directory")]
    ThroughNonDirectory(String),
    #[error("the root can only be a directory")]
    RootNotDirectory,
    #[error("hard link target {0} does not exist")]
    LinkTargetMissing(String),
    #[error("hard link target {0} is a directory")]
    LinkToDirectory(String),
    #[error("symlink target is empty")]
    EmptySymlink,
    #[error("symlink target has a NUL byte")]
    SymlinkNul,
    #[error("symlink target is {0} bytes, the limit is 4095")]
    SymlinkTooLong(usize),
    #[error("xattr {0}: only user.*, trusted.*, security.* and system.posix_acl_* can be stored")]
    XattrPrefix(String),
    #[error("xattr {0}: name after the prefix is empty or longer than 255 bytes")]
    XattrName(String),
    #[error("xattr {name}: value is {len} bytes, the limit is 65535")]
    XattrValue { name: String, len: usize },
    #[error("xattr {0} given twice")]
    XattrTwice(String),
    #[error("xattrs take {0} bytes, more than an inode can hold (256 KiB)")]
    XattrsTooLarge(usize),
    #[error("sparse map: {0}")]
    SparseMap(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("entry {entry}: {reason}")]
    Invalid { entry: String, reason: Invalid },
    #[error("entry {entry}: cannot read its data")]
    Read { entry: String, source: io::Error },
    #[error("entry {entry}: data ended after {got} of {size} bytes")]
    ShortData { entry: String, got: u64, size: u64 },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("image {path}: {what}")]
    Limit { path: PathBuf, what: String },
    #[error("image {path}: unusable after an earlier error")]
    Poisoned { path: PathBuf },
}

/// What [`ImageWriter::finish`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Image size in bytes (a multiple of 4096).
    pub bytes: u64,
    /// Reachable directories, including the root.
    pub dirs: u64,
    /// Reachable non-directory inodes (a hard-link group counts once).
    pub inodes: u64,
    /// Regular files whose last partial block went inline next to their inode.
    pub inline_tails: u64,
    /// Inodes whose path was later replaced: their records and data stay in the image,
    /// unreachable.
    pub orphans: u64,
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Metadata of directories made because an entry's parent was missing (tar archives
    /// need not list parents), and of the root until a root entry says otherwise.
    pub implicit_dir: Metadata,
    /// Put the last partial block of regular files next to their inode (see the module
    /// note). Off: every file's data is block-aligned on its own blocks, as with
    /// `mkfs.erofs -Enoinline_data`.
    pub inline_tails: bool,
    /// Start the writeback of what was written every this many bytes
    /// ([`crate::writeback`]), so the disk works while the stream is still arriving and
    /// the fsync at [`ImageWriter::finish`] finds little left. `None`: all at the end.
    pub writeback_every: Option<u64>,
    /// fsync the image at [`ImageWriter::finish`] (off only for throwaway images: the
    /// mount probe's).
    pub sync: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            implicit_dir: Metadata {
                mode: 0o755,
                ..Metadata::default()
            },
            inline_tails: true,
            writeback_every: None,
            sync: true,
        }
    }
}

/// A directory of the image being written, for [`ImageWriter::child`]. Directories are
/// numbered as they are made; [`DirId::ROOT`] is the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirId(u32);

impl DirId {
    pub const ROOT: DirId = DirId(0);
}

/// What a name in the image being written is now: a directory, or another inode (a
/// number shared by all hard links of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Dir(DirId),
    Inode(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Dir(u32),
    Inode(u32),
}

struct DirInfo {
    meta: Metadata,
    xattrs: Vec<Xattr>,
}

#[derive(Clone, Copy)]
struct InodeInfo {
    nid: u64,
    ftype: u8,
    compact: bool,
}

/// The metadata block being filled: records (inode + xattrs + inline data) of inodes
/// whose data is already written; the block itself goes to the end of the stream when the
/// next record does not fit.
struct Slab {
    buf: Vec<u8>,
    pending: Vec<(u32, u32)>,
}

struct SharedXattrs {
    area: Vec<u8>,
    ids: HashMap<Xattr, u32>,
    seen: HashSet<Xattr>,
}

/// Writes one EROFS image, streaming. Add entries in archive order, then [`finish`].
/// After any error other than [`ErofsError::Invalid`] the writer refuses further work
/// and the caller should delete the file.
///
/// [`finish`]: ImageWriter::finish
pub struct ImageWriter {
    out: BufWriter<File>,
    path: PathBuf,
    /// End of the stream: where the next block-aligned write goes.
    pos: u64,
    slab: Slab,
    /// `parent dir index (big-endian u32) ++ name` → child. Big-endian so that sorting the
    /// keys sorts by parent, then by name: exactly the dirent order.
    names: HashMap<Box<[u8]>, Child>,
    key: Vec<u8>,
    dirs: Vec<DirInfo>,
    inodes: Vec<InodeInfo>,
    shared: SharedXattrs,
    build_time: Option<(i64, u32)>,
    opts: WriterOptions,
    chunked: bool,
    poisoned: bool,
    inline_tails: u64,
    buf: Vec<u8>,
    /// Stream position at the last writeback kick.
    kicked: u64,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn invalid(entry: &[u8], reason: Invalid) -> ErofsError {
    ErofsError::Invalid {
        entry: lossy(entry),
        reason,
    }
}

/// Splits and checks a path: every component a valid single name.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, Invalid> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        if c.is_empty() {
            return Err(Invalid::EmptyComponent);
        }
        if c == b"." || c == b".." {
            return Err(Invalid::DotComponent);
        }
        if c.contains(&0) {
            return Err(Invalid::Nul);
        }
        if c.len() > 255 {
            return Err(Invalid::NameTooLong(c.len()));
        }
        out.push(c);
    }
    Ok(out)
}

fn parse_xattrs(list: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<Xattr>, Invalid> {
    let mut out: Vec<Xattr> = Vec::with_capacity(list.len());
    let mut names = HashSet::new();
    for (name, value) in list {
        let Some(&(prefix, index)) = format::XATTR_PREFIXES
            .iter()
            .find(|(p, _)| name.starts_with(p))
        else {
            return Err(Invalid::XattrPrefix(lossy(name)));
        };
        let suffix = &name[prefix.len()..];
        // The two ACL names are whole names; the three namespaces need a name after the dot.
        let ok = if prefix.ends_with(b".") {
            !suffix.is_empty() && suffix.len() <= 255
        } else {
            suffix.is_empty()
        };
        if !ok || name.contains(&0) {
            return Err(Invalid::XattrName(lossy(name)));
        }
        if value.len() > u16::MAX as usize {
            return Err(Invalid::XattrValue {
                name: lossy(name),
                len: value.len(),
            });
        }
        if !names.insert(name.as_slice()) {
            return Err(Invalid::XattrTwice(lossy(name)));
        }
        out.push(Xattr {
            index,
            suffix: suffix.into(),
            value: value.as_slice().into(),
        });
    }
    Ok(out)
}

/// Reads exactly `buf.len()` bytes, or says how many there were.
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];

impl ImageWriter {
    /// Creates `path` (which must not exist) and starts an image in it.
    pub fn create(path: &Path, opts: WriterOptions) -> Result<ImageWriter, ErofsError> {
        let file = File::options()
            .write(true)
            .read(true)
            .create_new(true)
            .open(path)
            .map_err(|source| ErofsError::Write {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self::from_file(file, path, opts))
    }

    /// Starts an image in an empty, writable `file`; `path` names it in errors.
    pub fn from_file(file: File, path: &Path, opts: WriterOptions) -> ImageWriter {
        let mut out = BufWriter::with_capacity(IO_BUF, file);
        // Block 0 (superblock + root inode) is written last, in place; the stream starts
        // at block 1. The seek leaves block 0 a hole until then.
        let _ = io::Seek::seek(&mut out, io::SeekFrom::Start(BLOCK));
        let root = DirInfo {
            meta: opts.implicit_dir.clone(),
            xattrs: Vec::new(),
        };
        ImageWriter {
            out,
            path: path.to_owned(),
            pos: BLOCK,
            slab: Slab {
                buf: Vec::with_capacity(BLOCK as usize),
                pending: Vec::new(),
            },
            names: HashMap::new(),
            key: Vec::new(),
            dirs: vec![root],
            inodes: Vec::new(),
            shared: SharedXattrs {
                area: Vec::new(),
                ids: HashMap::new(),
                seen: HashSet::new(),
            },
            build_time: None,
            opts,
            chunked: false,
            poisoned: false,
            inline_tails: 0,
            buf: vec![0; IO_BUF],
            kicked: 0,
        }
    }

    /// Adds one entry; `data` is read only for files (exactly their data bytes).
    pub fn add(&mut self, entry: &Entry<'_>, data: &mut dyn Read) -> Result<(), ErofsError> {
        if self.poisoned {
            return Err(ErofsError::Poisoned {
                path: self.path.clone(),
            });
        }
        let mut r = self.add_inner(entry, data);
        if r.is_ok() {
            r = self.kick_writeback();
        }
        if let Err(e) = &r {
            if !matches!(e, ErofsError::Invalid { .. }) {
                self.poisoned = true;
            }
        }
        r
    }

    /// What `name` in directory `dir` is now, if anything: for a sink that resolves
    /// paths itself (an image's in-root symlinks, `crate::extract`'s EROFS sink).
    pub fn child(&mut self, dir: DirId, name: &[u8]) -> Option<Node> {
        self.lookup(dir.0, name).map(|c| match c {
            Child::Dir(d) => Node::Dir(DirId(d)),
            Child::Inode(i) => Node::Inode(i),
        })
    }

    /// Makes `name` in `dir` a directory with [`WriterOptions::implicit_dir`] metadata, as
    /// a missing parent is made (nothing may be there yet: check with
    /// [`ImageWriter::child`]).
    pub fn make_implicit_dir(&mut self, dir: DirId, name: &[u8]) -> Result<DirId, ErofsError> {
        components(name)
            .ok()
            .filter(|c| c.len() == 1)
            .ok_or_else(|| invalid(name, Invalid::EmptyComponent))?;
        debug_assert!(self.lookup(dir.0, name).is_none(), "nothing there yet");
        self.dirs.push(DirInfo {
            meta: self.opts.implicit_dir.clone(),
            xattrs: Vec::new(),
        });
        let d = self.dirs.len() as u32 - 1;
        self.set_key(dir.0, name);
        self.names.insert(self.key.as_slice().into(), Child::Dir(d));
        Ok(DirId(d))
    }

    /// Every [`WriterOptions::writeback_every`] bytes: push the buffer into the page cache
    /// and have the writeback thread start writing the file back.
    fn kick_writeback(&mut self) -> Result<(), ErofsError> {
        let Some(every) = self.opts.writeback_every else {
            return Ok(());
        };
        if self.pos - self.kicked < every {
            return Ok(());
        }
        self.out.flush().map_err(|e| self.io_err(e))?;
        crate::writeback::written(self.out.get_ref());
        self.kicked = self.pos;
        Ok(())
    }

    pub fn add_dir(&mut self, path: &[u8], meta: &Metadata) -> Result<(), ErofsError> {
        let e = Entry {
            path,
            kind: EntryKind::Directory,
            meta,
        };
        self.add(&e, &mut io::empty())
    }

    pub fn add_file(
        &mut self,
        path: &[u8],
        meta: &Metadata,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), ErofsError> {
        let e = Entry {
            path,
            kind: EntryKind::File { size },
            meta,
        };
        self.add(&e, data)
    }

    pub fn add_symlink(
        &mut self,
        path: &[u8],
        meta: &Metadata,
        target: &[u8],
    ) -> Result<(), ErofsError> {
        let e = Entry {
            path,
            kind: EntryKind::Symlink { target },
            meta,
        };
        self.add(&e, &mut io::empty())
    }

    pub fn add_hard_link(&mut self, path: &[u8], target: &[u8]) -> Result<(), ErofsError> {
        let meta = Metadata::default();
        let e = Entry {
            path,
            kind: EntryKind::HardLink { target },
            meta: &meta,
        };
        self.add(&e, &mut io::empty())
    }

    fn add_inner(&mut self, e: &Entry<'_>, data: &mut dyn Read) -> Result<(), ErofsError> {
        let comps = components(e.path).map_err(|r| invalid(e.path, r))?;
        let is_dir = matches!(e.kind, EntryKind::Directory);
        if comps.is_empty() && !is_dir {
            return Err(invalid(e.path, Invalid::RootNotDirectory));
        }
        let xattrs = match e.kind {
            EntryKind::HardLink { .. } => Vec::new(),
            _ => parse_xattrs(&e.meta.xattrs).map_err(|r| invalid(e.path, r))?,
        };
        match e.kind {
            EntryKind::Symlink { target } => {
                if target.is_empty() {
                    return Err(invalid(e.path, Invalid::EmptySymlink));
                }
                if target.contains(&0) {
                    return Err(invalid(e.path, Invalid::SymlinkNul));
                }
                if target.len() > SYMLINK_MAX {
                    return Err(invalid(e.path, Invalid::SymlinkTooLong(target.len())));
                }
            }
            EntryKind::SparseFile { size, extents } => {
                check_extents(size, extents).map_err(|r| invalid(e.path, r))?
            }
            _ => {}
        }
        // A hard link's target is resolved before anything is created.
        let link_to = match e.kind {
            EntryKind::HardLink { target } => Some(self.resolve_link(e.path, target)?),
            _ => None,
        };
        if e.kind_has_meta() {
            self.build_time
                .get_or_insert((e.meta.mtime, e.meta.mtime_nsec));
        }

        if comps.is_empty() {
            let root = &mut self.dirs[0];
            root.meta = e.meta.clone();
            root.xattrs = xattrs;
            return Ok(());
        }
        let (name, parents) = comps.split_last().expect("non-empty");
        let parent = self.resolve_parent(e.path, parents)?;
        self.set_key(parent, name);

        let child = match e.kind {
            EntryKind::Directory => {
                if let Some(Child::Dir(d)) = self.names.get(self.key.as_slice()).copied() {
                    // A directory over a directory merges: children stay, metadata is the
                    // later entry's.
                    let dir = &mut self.dirs[d as usize];
                    dir.meta = e.meta.clone();
                    dir.xattrs = xattrs;
                    return Ok(());
                }
                self.dirs.push(DirInfo {
                    meta: e.meta.clone(),
                    xattrs,
                });
                Child::Dir(self.dirs.len() as u32 - 1)
            }
            EntryKind::HardLink { .. } => Child::Inode(link_to.expect("resolved")),
            EntryKind::File { size } => Child::Inode(self.write_file(e, &xattrs, size, data)?),
            EntryKind::SparseFile { size, extents } => {
                Child::Inode(self.write_sparse(e, &xattrs, size, extents, data)?)
            }
            EntryKind::Symlink { target } => Child::Inode(self.write_symlink(e, &xattrs, target)?),
            EntryKind::Fifo => Child::Inode(self.write_special(e, &xattrs, format::S_IFIFO, 0)?),
            EntryKind::Socket => {
                Child::Inode(self.write_special(e, &xattrs, format::S_IFSOCK, 0)?)
            }
            EntryKind::CharDevice { major, minor } => Child::Inode(self.write_special(
                e,
                &xattrs,
                format::S_IFCHR,
                format::encode_rdev(major, minor),
            )?),
            EntryKind::BlockDevice { major, minor } => Child::Inode(self.write_special(
                e,
                &xattrs,
                format::S_IFBLK,
                format::encode_rdev(major, minor),
            )?),
        };
        // The file's data may have taken a while; the key buffer is ours alone, but set it
        // again for clarity of the invariant.
        self.set_key(parent, name);
        // A later entry replaces an earlier one of the same name. A replaced directory's
        // subtree becomes unreachable and is never written; a replaced inode loses a link.
        self.names.insert(self.key.as_slice().into(), child);
        Ok(())
    }

    fn set_key(&mut self, parent: u32, name: &[u8]) {
        self.key.clear();
        self.key.extend_from_slice(&parent.to_be_bytes());
        self.key.extend_from_slice(name);
    }

    fn lookup(&mut self, parent: u32, name: &[u8]) -> Option<Child> {
        self.set_key(parent, name);
        self.names.get(self.key.as_slice()).copied()
    }

    /// Walks to the directory holding the entry, making missing directories.
    fn resolve_parent(&mut self, path: &[u8], parents: &[&[u8]]) -> Result<u32, ErofsError> {
        let mut dir = 0u32;
        let mut walked = 0usize;
        for (i, c) in parents.iter().enumerate() {
            walked += c.len() + usize::from(i > 0);
            dir = match self.lookup(dir, c) {
                Some(Child::Dir(d)) => d,
                Some(Child::Inode(_)) => {
                    return Err(invalid(
                        path,
                        Invalid::ThroughNonDirectory(lossy(&path[..walked])),
                    ))
                }
                None => {
                    self.dirs.push(DirInfo {
                        meta: self.opts.implicit_dir.clone(),
                        xattrs: Vec::new(),
                    });
                    let d = self.dirs.len() as u32 - 1;
                    self.set_key(dir, c);
                    self.names.insert(self.key.as_slice().into(), Child::Dir(d));
                    d
                }
            };
        }
        Ok(dir)
    }

    fn resolve_link(&mut self, path: &[u8], target: &[u8]) -> Result<u32, ErofsError> {
        let comps = components(target).map_err(|r| invalid(path, r))?;
        let missing = || invalid(path, Invalid::LinkTargetMissing(lossy(target)));
        let Some((last, parents)) = comps.split_last() else {
            return Err(invalid(path, Invalid::LinkToDirectory(lossy(target))));
        };
        let mut dir = 0u32;
        for c in parents {
            dir = match self.lookup(dir, c) {
                Some(Child::Dir(d)) => d,
                _ => return Err(missing()),
            };
        }
        match self.lookup(dir, last) {
            Some(Child::Inode(i)) => Ok(i),
            Some(Child::Dir(_)) => Err(invalid(path, Invalid::LinkToDirectory(lossy(target)))),
            None => Err(missing()),
        }
    }

    fn io_err(&self, source: io::Error) -> ErofsError {
        ErofsError::Write {
            path: self.path.clone(),
            source,
        }
    }

    fn compact_ok(&self, meta: &Metadata, size: u64) -> bool {
        meta.uid <= u16::MAX as u32
            && meta.gid <= u16::MAX as u32
            && size <= u32::MAX as u64
            && self.build_time == Some((meta.mtime, meta.mtime_nsec))
    }

    fn blkaddr(&self) -> Result<u32, ErofsError> {
        u32::try_from(self.pos / BLOCK).map_err(|_| ErofsError::Limit {
            path: self.path.clone(),
            what: "larger than 16 TiB".into(),
        })
    }

    fn write_zeros(&mut self, mut n: u64) -> Result<(), ErofsError> {
        while n > 0 {
            let k = n.min(BLOCK);
            self.out
                .write_all(&ZEROS[..k as usize])
                .map_err(|e| self.io_err(e))?;
            n -= k;
        }
        Ok(())
    }

    /// Copies `n` data bytes of entry `entry` from `data` into the stream. `done` and
    /// `size` are for the short-data error.
    fn copy_data(
        &mut self,
        entry: &[u8],
        data: &mut dyn Read,
        n: u64,
        done: &mut u64,
        size: u64,
    ) -> Result<(), ErofsError> {
        let mut left = n;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let got = fill(data, &mut self.buf[..want]).map_err(|source| ErofsError::Read {
                entry: lossy(entry),
                source,
            })?;
            self.out
                .write_all(&self.buf[..got])
                .map_err(|e| ErofsError::Write {
                    path: self.path.clone(),
                    source: e,
                })?;
            *done += got as u64;
            if got < want {
                return Err(ErofsError::ShortData {
                    entry: lossy(entry),
                    got: *done,
                    size,
                });
            }
            left -= got as u64;
        }
        Ok(())
    }

    /// The xattr body of an inode: header, shared ids, inline entries. An xattr seen on an
    /// earlier inode goes to the shared area (4 bytes per further use instead of its whole
    /// entry); `all_shared` puts every one there (the root, whose space is fixed).
    fn xattr_body(
        &mut self,
        entry: &[u8],
        xattrs: &[Xattr],
        all_shared: bool,
    ) -> Result<Vec<u8>, ErofsError> {
        if xattrs.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::new();
        let mut inline = Vec::new();
        for x in xattrs {
            let id = if let Some(&id) = self.shared.ids.get(x) {
                Some(id)
            } else if ids.len() < 255 && (all_shared || self.shared.seen.contains(x)) {
                let id = (self.shared.area.len() / 4) as u32;
                x.encode(&mut self.shared.area);
                self.shared.seen.remove(x);
                self.shared.ids.insert(x.clone(), id);
                Some(id)
            } else {
                if self.shared.seen.len() < XATTR_SEEN_MAX {
                    self.shared.seen.insert(x.clone());
                }
                None
            };
            match id {
                Some(id) if ids.len() < 255 => ids.push(id),
                _ => x.encode(&mut inline),
            }
        }
        let mut body =
            Vec::with_capacity(format::XATTR_IBODY_HEADER + ids.len() * 4 + inline.len());
        body.extend_from_slice(&0u32.to_le_bytes()); // h_name_filter: the filter feature is off
        body.push(ids.len() as u8);
        body.extend_from_slice(&[0u8; 7]);
        for id in ids {
            body.extend_from_slice(&id.to_le_bytes());
        }
        body.extend_from_slice(&inline);
        if (body.len() - format::XATTR_IBODY_HEADER) / 4 + 1 > u16::MAX as usize {
            return Err(invalid(entry, Invalid::XattrsTooLarge(body.len())));
        }
        Ok(body)
    }

    fn icount(body: &[u8]) -> u16 {
        if body.is_empty() {
            0
        } else {
            ((body.len() - format::XATTR_IBODY_HEADER) / 4 + 1) as u16
        }
    }

    fn new_inode(&mut self, ftype: u8, compact: bool) -> u32 {
        self.inodes.push(InodeInfo {
            nid: PENDING,
            ftype,
            compact,
        });
        self.inodes.len() as u32 - 1
    }

    fn fields(&self, meta: &Metadata, compact: bool, ifmt: u32, body: &[u8]) -> InodeFields {
        InodeFields {
            compact,
            layout: format::LAYOUT_FLAT_PLAIN,
            xattr_icount: Self::icount(body),
            mode: (ifmt | (meta.mode & 0o7777)) as u16,
            nlink: 1,
            size: 0,
            i_u: 0,
            ino: 0,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
            mtime_nsec: meta.mtime_nsec,
        }
    }

    /// Free bytes left in the open slab for a 32-byte aligned record.
    fn slab_free(&self) -> usize {
        BLOCK as usize - self.slab.buf.len().next_multiple_of(NID_UNIT as usize)
    }

    fn flush_slab(&mut self) -> Result<(), ErofsError> {
        if self.slab.buf.is_empty() {
            return Ok(());
        }
        let base = self.pos;
        self.slab.buf.resize(BLOCK as usize, 0);
        self.out
            .write_all(&self.slab.buf)
            .map_err(|e| ErofsError::Write {
                path: self.path.clone(),
                source: e,
            })?;
        self.pos += BLOCK;
        for (inode, off) in self.slab.pending.drain(..) {
            self.inodes[inode as usize].nid = (base + off as u64) / NID_UNIT;
        }
        self.slab.buf.clear();
        Ok(())
    }

    /// Places an inode's record: in the open slab when it fits in a block, else on blocks
    /// of its own at the end of the stream.
    fn place(
        &mut self,
        inode: u32,
        ino: &mut InodeFields,
        rest: &[&[u8]],
    ) -> Result<(), ErofsError> {
        ino.ino = inode + 2; // 1 is the root's
        let len = ino.size_on_disk() + rest.iter().map(|r| r.len()).sum::<usize>();
        if len > BLOCK as usize {
            let nid = self.pos / NID_UNIT;
            let mut rec = Vec::with_capacity(len);
            ino.encode(&mut rec);
            for r in rest {
                rec.extend_from_slice(r);
            }
            self.out.write_all(&rec).map_err(|e| self.io_err(e))?;
            let pad = format::round_up(len as u64, BLOCK) - len as u64;
            self.write_zeros(pad)?;
            self.pos += len as u64 + pad;
            self.inodes[inode as usize].nid = nid;
            return Ok(());
        }
        if len > self.slab_free() {
            self.flush_slab()?;
        }
        let off = self.slab.buf.len().next_multiple_of(NID_UNIT as usize);
        self.slab.buf.resize(off, 0);
        ino.encode(&mut self.slab.buf);
        for r in rest {
            self.slab.buf.extend_from_slice(r);
        }
        self.slab.pending.push((inode, off as u32));
        Ok(())
    }

    fn write_file(
        &mut self,
        e: &Entry<'_>,
        xattrs: &[Xattr],
        size: u64,
        data: &mut dyn Read,
    ) -> Result<u32, ErofsError> {
        let body = self.xattr_body(e.path, xattrs, false)?;
        let compact = self.compact_ok(e.meta, size);
        let mut ino = self.fields(e.meta, compact, format::S_IFREG, &body);
        ino.size = size;
        let full = size / BLOCK;
        let tail = (size % BLOCK) as usize;
        let header = ino.size_on_disk() + body.len();
        // Inline the tail when the record fits the open slab, or when starting a new slab
        // wastes less than padding the tail to a block would.
        let inline = self.opts.inline_tails
            && tail > 0
            && header + tail <= BLOCK as usize
            && (header + tail <= self.slab_free() || self.slab_free() < BLOCK as usize - tail);
        let blocks = if inline { full } else { size.div_ceil(BLOCK) };
        if blocks > 0 {
            ino.i_u = self.blkaddr()?;
        }
        let mut done = 0u64;
        self.copy_data(e.path, data, full * BLOCK, &mut done, size)?;
        self.pos += full * BLOCK;
        let mut tailbuf = Vec::new();
        if tail > 0 {
            tailbuf.resize(tail, 0);
            let got = fill(data, &mut tailbuf).map_err(|source| ErofsError::Read {
                entry: lossy(e.path),
                source,
            })?;
            if got < tail {
                return Err(ErofsError::ShortData {
                    entry: lossy(e.path),
                    got: done + got as u64,
                    size,
                });
            }
            if !inline {
                self.out.write_all(&tailbuf).map_err(|e| self.io_err(e))?;
                self.write_zeros(BLOCK - tail as u64)?;
                self.pos += BLOCK;
                tailbuf.clear();
            }
        }
        if inline {
            ino.layout = format::LAYOUT_FLAT_INLINE;
            self.inline_tails += 1;
        }
        let inode = self.new_inode(format::FT_REG, compact);
        self.place(inode, &mut ino, &[&body, &tailbuf])?;
        Ok(inode)
    }

    fn write_sparse(
        &mut self,
        e: &Entry<'_>,
        xattrs: &[Xattr],
        size: u64,
        extents: &[Extent],
        data: &mut dyn Read,
    ) -> Result<u32, ErofsError> {
        let extents: Vec<Extent> = extents.iter().copied().filter(|x| x.len > 0).collect();
        if extents.len() == 1 && extents[0].offset == 0 && extents[0].len == size || size == 0 {
            return self.write_file(e, xattrs, size, data);
        }
        let total_blocks = size.div_ceil(BLOCK);
        // Block ranges holding data, merged.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for x in &extents {
            let (s, t) = (x.offset / BLOCK, (x.offset + x.len).div_ceil(BLOCK));
            match ranges.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(t),
                _ => ranges.push((s, t)),
            }
        }
        // The largest chunk (a power of two of blocks) at which every data/hole boundary
        // falls on a chunk boundary: no zeros are written that a 4 KiB hole would spare,
        // and the chunk map is as small as it can be.
        let mut bits = 31u32;
        for &(s, t) in &ranges {
            for b in [s, t] {
                if b != 0 && b != total_blocks {
                    bits = bits.min(b.trailing_zeros());
                }
            }
        }
        bits = bits
            .min(64 - total_blocks.next_power_of_two().leading_zeros() - 1)
            .min(31);
        let chunk = 1u64 << bits;
        let nchunks = total_blocks.div_ceil(chunk);
        let mut map = Vec::with_capacity(nchunks as usize * 4);
        let mut ri = 0usize;
        let mut xi = 0usize;
        let mut done = 0u64;
        let data_len: u64 = extents.iter().map(|x| x.len).sum();
        for k in 0..nchunks {
            let (lo, hi) = (k * chunk, ((k + 1) * chunk).min(total_blocks));
            while ri < ranges.len() && ranges[ri].1 <= lo {
                ri += 1;
            }
            let mapped = ri < ranges.len() && ranges[ri].0 < hi;
            if !mapped {
                map.extend_from_slice(&format::NULL_ADDR.to_le_bytes());
                continue;
            }
            map.extend_from_slice(&self.blkaddr()?.to_le_bytes());
            // Logical bytes [lo, hi) blocks: data where an extent is, zeros elsewhere.
            let (mut p, end) = (lo * BLOCK, hi * BLOCK);
            while p < end {
                while xi < extents.len() && extents[xi].offset + extents[xi].len <= p {
                    xi += 1;
                }
                match extents.get(xi) {
                    Some(x) if x.offset <= p => {
                        let n = (x.offset + x.len).min(end) - p;
                        self.copy_data(e.path, data, n, &mut done, data_len)?;
                        p += n;
                    }
                    Some(x) => {
                        let n = x.offset.min(end) - p;
                        self.write_zeros(n)?;
                        p += n;
                    }
                    None => {
                        self.write_zeros(end - p)?;
                        p = end;
                    }
                }
            }
            self.pos += (hi - lo) * BLOCK;
        }
        let body = self.xattr_body(e.path, xattrs, false)?;
        let compact = self.compact_ok(e.meta, size);
        let mut ino = self.fields(e.meta, compact, format::S_IFREG, &body);
        ino.size = size;
        ino.layout = format::LAYOUT_CHUNK_BASED;
        ino.i_u = bits; // 4-byte block map (no EROFS_CHUNK_FORMAT_INDEXES)
        self.chunked = true;
        // The block map starts 4-byte aligned after inode + xattrs; both are multiples of 4.
        let inode = self.new_inode(format::FT_REG, compact);
        self.place(inode, &mut ino, &[&body, &map])?;
        Ok(inode)
    }

    fn write_symlink(
        &mut self,
        e: &Entry<'_>,
        xattrs: &[Xattr],
        target: &[u8],
    ) -> Result<u32, ErofsError> {
        let body = self.xattr_body(e.path, xattrs, false)?;
        let size = target.len() as u64;
        let compact = self.compact_ok(e.meta, size);
        let mut ino = self.fields(e.meta, compact, format::S_IFLNK, &body);
        // Linux symlinks are always rwxrwxrwx (chmod cannot change them): store what any
        // filesystem shows, whatever the archive said.
        ino.mode = (format::S_IFLNK | 0o777) as u16;
        ino.size = size;
        let inode = self.new_inode(format::FT_SYMLINK, compact);
        if ino.size_on_disk() + body.len() + target.len() <= BLOCK as usize {
            // A "fast" symlink: the kernel reads the target from the inode's block.
            ino.layout = format::LAYOUT_FLAT_INLINE;
            self.place(inode, &mut ino, &[&body, target])?;
        } else {
            ino.i_u = self.blkaddr()?;
            self.out.write_all(target).map_err(|e| self.io_err(e))?;
            self.write_zeros(BLOCK - size)?;
            self.pos += BLOCK;
            self.place(inode, &mut ino, &[&body])?;
        }
        Ok(inode)
    }

    fn write_special(
        &mut self,
        e: &Entry<'_>,
        xattrs: &[Xattr],
        ifmt: u32,
        rdev: u32,
    ) -> Result<u32, ErofsError> {
        let body = self.xattr_body(e.path, xattrs, false)?;
        let compact = self.compact_ok(e.meta, 0);
        let mut ino = self.fields(e.meta, compact, ifmt, &body);
        ino.i_u = rdev;
        let ft = match ifmt {
            format::S_IFIFO => format::FT_FIFO,
            format::S_IFSOCK => format::FT_SOCK,
            format::S_IFCHR => format::FT_CHRDEV,
            _ => format::FT_BLKDEV,
        };
        let inode = self.new_inode(ft, compact);
        self.place(inode, &mut ino, &[&body])?;
        Ok(inode)
    }

    /// Writes directories, the shared xattrs and the superblock, fsyncs once, and closes.
    pub fn finish(self) -> Result<ImageStats, ErofsError> {
        self.finish_inner(false).map(|(stats, _)| stats)
    }

    /// [`ImageWriter::finish`], also returning the image's sha256 (lowercase hex): the
    /// complete file is read back from the page cache and hashed on a second thread while
    /// the fsync waits for the disk, so the hash costs no wall time where the disk is the
    /// bottleneck. (A hash computed while streaming would not do: block 0 and the link
    /// counts are written in place at the end.)
    pub fn finish_hashed(self) -> Result<(ImageStats, String), ErofsError> {
        self.finish_inner(true)
            .map(|(stats, sha)| (stats, sha.expect("hashed on request")))
    }

    fn finish_inner(mut self, hash: bool) -> Result<(ImageStats, Option<String>), ErofsError> {
        if self.poisoned {
            return Err(ErofsError::Poisoned {
                path: self.path.clone(),
            });
        }
        self.flush_slab()?;

        // Every name, sorted by (parent, name): the dirent order.
        let names = std::mem::take(&mut self.names);
        let mut entries: Vec<(&[u8], Child)> = names.iter().map(|(k, c)| (&k[..], *c)).collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let parent_of = |k: &[u8]| u32::from_be_bytes(k[..4].try_into().expect("4 bytes"));
        // Children of each directory: a range of `entries`.
        let mut range = vec![(0usize, 0usize); self.dirs.len()];
        let mut i = 0;
        while i < entries.len() {
            let p = parent_of(entries[i].0);
            let s = i;
            while i < entries.len() && parent_of(entries[i].0) == p {
                i += 1;
            }
            range[p as usize] = (s, i);
        }
        // Reachable directories, breadth first from the root, with their parents.
        let mut order: Vec<u32> = vec![0];
        let mut parent = vec![u32::MAX; self.dirs.len()];
        parent[0] = 0;
        let mut links = vec![0u32; self.inodes.len()];
        let mut subdirs = vec![0u32; self.dirs.len()];
        let mut qi = 0;
        while qi < order.len() {
            let d = order[qi];
            qi += 1;
            let (s, t) = range[d as usize];
            for (_, c) in &entries[s..t] {
                match *c {
                    Child::Dir(j) => {
                        parent[j as usize] = d;
                        subdirs[d as usize] += 1;
                        order.push(j);
                    }
                    Child::Inode(n) => links[n as usize] += 1,
                }
            }
        }

        // Pass 1: lay out every directory (sizes do not depend on nids).
        struct DirLayout {
            body: Vec<u8>,
            fields: InodeFields,
            block_starts: Vec<u32>,
            full_blocks: u64,
            tail: usize,
            blkaddr: u64,
            nid: u64,
        }
        let dots: [&[u8]; 2] = [b".", b".."];
        let mut layouts: Vec<DirLayout> = Vec::with_capacity(order.len());
        for &d in &order {
            let (s, t) = range[d as usize];
            let names = merged_names(&entries[s..t], &dots).map(|(n, _)| n);
            let (block_starts, last_used) = format::dirent_blocks(names);
            let nblocks = block_starts.len() as u64;
            let size = (nblocks - 1) * BLOCK + last_used as u64;
            let xattrs = std::mem::take(&mut self.dirs[d as usize].xattrs);
            let body = self.xattr_body(b"/", &xattrs, d == 0)?;
            let meta = &self.dirs[d as usize].meta;
            let compact = self.compact_ok(meta, size);
            let mut fields = self.fields(meta, compact, format::S_IFDIR, &body);
            fields.size = size;
            fields.nlink = 2 + subdirs[d as usize];
            let room = if d == 0 {
                (BLOCK - ROOT_OFFSET) as usize
            } else {
                BLOCK as usize
            };
            let header = fields.size_on_disk() + body.len();
            if d == 0 && header > room {
                return Err(ErofsError::Limit {
                    path: self.path.clone(),
                    what: "the root directory's inode and xattrs do not fit block 0".into(),
                });
            }
            let inline = header + last_used <= room;
            let (full_blocks, tail) = if inline {
                fields.layout = format::LAYOUT_FLAT_INLINE;
                (nblocks - 1, last_used)
            } else {
                (nblocks, 0)
            };
            layouts.push(DirLayout {
                body,
                fields,
                block_starts,
                full_blocks,
                tail,
                blkaddr: 0,
                nid: 0,
            });
        }
        // Positions: all full dirent blocks first, then the records packed into blocks.
        let mut blk = self.pos / BLOCK;
        for l in &mut layouts {
            if l.full_blocks > 0 {
                l.blkaddr = blk;
                blk += l.full_blocks;
            }
        }
        let meta_start = blk * BLOCK;
        let mut off = meta_start;
        for (k, l) in layouts.iter_mut().enumerate() {
            if k == 0 {
                l.nid = ROOT_NID;
                continue;
            }
            let len = (l.fields.size_on_disk() + l.body.len() + l.tail) as u64;
            let mut o = format::round_up(off, NID_UNIT);
            // Records never straddle a block (an inline tail must not); one larger than a
            // block (huge xattrs) starts on its own block.
            if o % BLOCK + len > BLOCK {
                o = format::round_up(o, BLOCK);
            }
            l.nid = o / NID_UNIT;
            off = o + len;
        }
        let meta_end = format::round_up(off, BLOCK);
        let xattr_blk = meta_end / BLOCK;
        let end = meta_end + format::round_up(self.shared.area.len() as u64, BLOCK);
        if end / BLOCK > u32::MAX as u64 {
            return Err(ErofsError::Limit {
                path: self.path.clone(),
                what: "larger than 16 TiB".into(),
            });
        }
        let mut dir_nid = vec![0u64; self.dirs.len()];
        for (k, &d) in order.iter().enumerate() {
            dir_nid[d as usize] = layouts[k].nid;
        }

        // Pass 2: write the dirent blocks, then the records, then the shared xattrs.
        let mut ino_no = self.inodes.len() as u32 + 2;
        let mut block = Vec::with_capacity(BLOCK as usize);
        let mut tails: Vec<Vec<u8>> = Vec::with_capacity(layouts.len());
        for (k, &d) in order.iter().enumerate() {
            let (s, t) = range[d as usize];
            let l = &layouts[k];
            let all: Vec<(u64, u8, &[u8])> = merged_names(&entries[s..t], &dots)
                .map(|(name, c)| {
                    let (nid, ft) = match c {
                        Slot::Dot => (dir_nid[d as usize], format::FT_DIR),
                        Slot::DotDot => (dir_nid[parent[d as usize] as usize], format::FT_DIR),
                        Slot::Child(Child::Dir(j)) => (dir_nid[j as usize], format::FT_DIR),
                        Slot::Child(Child::Inode(n)) => {
                            let i = self.inodes[n as usize];
                            (i.nid, i.ftype)
                        }
                    };
                    (nid, ft, name)
                })
                .collect();
            let nb = l.block_starts.len();
            let mut tail = Vec::new();
            for b in 0..nb {
                let s = l.block_starts[b] as usize;
                let t = l.block_starts.get(b + 1).map_or(all.len(), |&x| x as usize);
                block.clear();
                format::encode_dirent_block(&all[s..t], &mut block);
                if (b as u64) < l.full_blocks {
                    block.resize(BLOCK as usize, 0);
                    self.out.write_all(&block).map_err(|e| self.io_err(e))?;
                } else {
                    tail = block.clone();
                }
            }
            tails.push(tail);
        }
        let mut written = meta_start;
        let mut root_rec = Vec::new();
        for (k, l) in layouts.iter_mut().enumerate() {
            if l.full_blocks > 0 {
                l.fields.i_u = l.blkaddr as u32;
            }
            l.fields.ino = if k == 0 { 1 } else { ino_no };
            if k > 0 {
                ino_no += 1;
            }
            let mut rec = Vec::with_capacity(EXT_REC);
            l.fields.encode(&mut rec);
            rec.extend_from_slice(&l.body);
            rec.extend_from_slice(&tails[k]);
            if k == 0 {
                root_rec = rec;
                continue;
            }
            let at = l.nid * NID_UNIT;
            self.write_zeros(at - written)?;
            self.out.write_all(&rec).map_err(|e| self.io_err(e))?;
            written = at + rec.len() as u64;
        }
        self.write_zeros(meta_end - written)?;
        let area = std::mem::take(&mut self.shared.area);
        self.out.write_all(&area).map_err(|e| self.io_err(e))?;
        self.write_zeros(end - meta_end - area.len() as u64)?;
        self.out.flush().map_err(|e| self.io_err(e))?;

        // Link counts: records were written with 1; fix the others in place.
        let file = self.out.get_ref();
        let mut orphans = 0u64;
        let mut live = 0u64;
        for (n, &count) in links.iter().enumerate() {
            let i = self.inodes[n];
            if count == 0 {
                orphans += 1;
                continue;
            }
            live += 1;
            if count == 1 {
                continue;
            }
            let (at, width) = InodeFields::nlink_field(i.compact);
            if width == 2 && count > u16::MAX as u32 {
                return Err(ErofsError::Limit {
                    path: self.path.clone(),
                    what: format!("an inode has {count} hard links, the limit is 65535"),
                });
            }
            let bytes = count.to_le_bytes();
            file.write_all_at(&bytes[..width], i.nid * NID_UNIT + at as u64)
                .map_err(|e| ErofsError::Write {
                    path: self.path.clone(),
                    source: e,
                })?;
        }

        let (build_time, build_time_nsec) = self.build_time.unwrap_or((0, 0));
        let sb = Superblock {
            feature_compat: format::FEATURE_COMPAT_MTIME,
            feature_incompat: if self.chunked {
                format::FEATURE_INCOMPAT_CHUNKED_FILE
            } else {
                0
            },
            root_nid: ROOT_NID as u16,
            inos: live + order.len() as u64,
            build_time,
            build_time_nsec,
            blocks: (end / BLOCK) as u32,
            meta_blkaddr: 0,
            xattr_blkaddr: if area.is_empty() { 0 } else { xattr_blk as u32 },
            uuid: rand::random(),
        };
        let mut block0 = vec![0u8; BLOCK as usize];
        block0[format::SUPER_OFFSET as usize..ROOT_OFFSET as usize].copy_from_slice(&sb.encode());
        block0[ROOT_OFFSET as usize..ROOT_OFFSET as usize + root_rec.len()]
            .copy_from_slice(&root_rec);
        let io = |source| ErofsError::Write {
            path: self.path.clone(),
            source,
        };
        file.write_all_at(&block0, 0).map_err(io)?;
        file.set_len(end).map_err(io)?;
        let sha = std::thread::scope(|s| {
            let hasher = hash.then(|| s.spawn(|| hash_file(file, end)));
            if self.opts.sync {
                file.sync_all().map_err(io)?;
            }
            hasher
                .map(|h| h.join().expect("hashing does not panic").map_err(io))
                .transpose()
        })?;
        let stats = ImageStats {
            bytes: end,
            dirs: order.len() as u64,
            inodes: live,
            inline_tails: self.inline_tails,
            orphans,
        };
        Ok((stats, sha))
    }
}

/// sha256 of the first `len` bytes of `file`, read with `pread` (the writer's fd is shared
/// with the fsync running beside it).
fn hash_file(file: &File, len: u64) -> io::Result<String> {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; IO_BUF];
    let mut at = 0u64;
    while at < len {
        let want = (len - at).min(IO_BUF as u64) as usize;
        let n = file.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("image ended at byte {at} of {len} while hashing it"),
            ));
        }
        sha.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(sha.finalize()))
}

/// Room reserved for a directory record before its tail is appended.
const EXT_REC: usize = 128;

#[derive(Clone, Copy)]
enum Slot {
    Dot,
    DotDot,
    Child(Child),
}

/// A directory's names in dirent order: its children (sorted, key = parent ++ name) with
/// `.` and `..` merged in where they sort.
fn merged_names<'a>(
    children: &'a [(&'a [u8], Child)],
    dots: &'a [&'a [u8]; 2],
) -> impl Iterator<Item = (&'a [u8], Slot)> + 'a {
    let mut dots_it = dots
        .iter()
        .zip([Slot::Dot, Slot::DotDot])
        .map(|(n, s)| (*n, s))
        .peekable();
    let mut kids = children
        .iter()
        .map(|(k, c)| (&k[4..], Slot::Child(*c)))
        .peekable();
    std::iter::from_fn(move || match (dots_it.peek(), kids.peek()) {
        (Some(d), Some(k)) => {
            if d.0 < k.0 {
                dots_it.next()
            } else {
                kids.next()
            }
        }
        (Some(_), None) => dots_it.next(),
        (None, _) => kids.next(),
    })
}

fn check_extents(size: u64, extents: &[Extent]) -> Result<(), Invalid> {
    let mut end = 0u64;
    for x in extents {
        let Some(e) = x.offset.checked_add(x.len) else {
            return Err(Invalid::SparseMap("extent overflows".into()));
        };
        if x.offset < end {
            return Err(Invalid::SparseMap(format!(
                "extent at {} overlaps or is out of order",
                x.offset
            )));
        }
        if e > size {
            return Err(Invalid::SparseMap(format!(
                "extent {}+{} ends past the file size {size}",
                x.offset, x.len
            )));
        }
        end = e;
    }
    Ok(())
}

impl Entry<'_> {
    fn kind_has_meta(&self) -> bool {
        !matches!(self.kind, EntryKind::HardLink { .. })
    }
}
