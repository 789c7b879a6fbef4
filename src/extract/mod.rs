//! Safe, streaming extraction of a tar stream into a staging directory.
//!
//! # Shape
//!
//! The HTTP body arrives asynchronously, but everything after the hasher is a synchronous
//! pipeline on dedicated threads:
//!
//! ```text
//! decoder(Format, impl Read) ─► tar::Reader ─► policy::plan ─► writer thread(s) ─► staging dir
//!        (parse thread: decompress, parse, decide, make dirs/links)  (regular files)
//! ```
//!
//! Why synchronous: every step is a blocking system call or CPU work. uv measured one
//! blocking task per archive fed by a bounded pipe at 2–3× faster than one `spawn_blocking`
//! per file operation, and rustup found that a few writer threads help on slow disks, where
//! file *creation* latency, not bandwidth, dominates. So the parse thread pulls decompressed
//! bytes, reads entries with vrun's own tar reader (`crate::tar`, which follows GNU tar
//! rule by rule; its module note says why it replaced the `tar` crate), lets
//! `policy::plan` decide what each becomes under the mode's rules, does the namespace work
//! itself, and hands regular files (header + data, bounded by a byte budget) to writer
//! threads (`writer`). The reader and the policy know nothing of directories: they are
//! what an image sink (issue 15) shares with this one. The number of writers is [`Writers`]; the default (4) was
//! measured with `VRUN_BENCH_ONESHOT=7 cargo bench --bench writer` on this shared 2-core
//! machine: a 248 MB / 12k-file build `.tar.gz` onto a fresh loop-mounted ext4 took median
//! 1.64 s inline, 1.72 s with 1 writer, 1.64 s with 2, 1.52 s with 4 (GNU `tar xzf`:
//! 2.57 s); on tmpfs 1.31 / 1.14 / 1.15 / 1.21 s (`tar xzf` 2.16 s). For the plain tar, where
//! there is nothing to overlap, inline was best on ext4 (1.11 s; 4 writers 1.18 s; `tar xf`
//! 1.16 s). Writer threads let decompression overlap file creation; beyond the
//! second core they only help while a writer is blocked in the kernel (slow disks, dirty
//! page throttling), which is what rustup measured too, and they cost no memory here: all
//! writers share one byte budget.
//!
//! # Rules
//!
//! `Mode::Build` follows PEP 706's `data` filter: leading `/` stripped; any `..` component
//! refused (simplest safe rule); absolute symlinks, symlinks leaving the tree (see
//! `policy::check_symlink`), hard links outside the tree, devices and fifos refused;
//! setuid/setgid/sticky and group/other write cleared, exec bits kept, files at least
//! `u+rw`, directories at least `u+rwx`; every entry owned by the proc's uid:gid, set at
//! creation time (`fchown` on the fd, `fchownat(AT_SYMLINK_NOFOLLOW)`), so there is no
//! second chown walk. A symlink in the middle of a path is an error.
//!
//! `Mode::Image` follows containerd: every path resolved inside the root (absolute
//! symlinks allowed and resolved relative to the root, `..` clamped at the root), numeric
//! owners and all 12 mode bits kept, hard links only within the root, character/block
//! devices and fifos skipped and counted (LXC's autodev provides `/dev`).
//!
//! Extended attributes (`SCHILY.xattr.*`): images apply them, `security.capability`
//! included, after the owner and mode and before the mtime; POSIX ACLs are dropped and
//! counted; builds drop every xattr, counted (`ExtractStats`, `--timings`). Sparse files
//! are written with holes and count by the data they really hold against `max_bytes`.
//! Modification times keep their nanoseconds (PAX `mtime`) and may be before 1970.
//!
//! Both modes: a symlink is never followed when creating, chmodding or chowning the final
//! component (`tree`); a later entry replaces an earlier one of the same name (unlink
//! first, never write through; a directory over a directory merges metadata); directory
//! modes and mtimes are applied after all entries, deepest first, through `O_NOFOLLOW`
//! fds, so a read-only directory never blocks its children.
//!
//! # End of the stream
//!
//! After the tar end-of-archive marker the rest of the decoded stream is read to its end:
//! zero blocks are fine (tar pads to its record size), anything else is "junk after the
//! end" and an error, because a stream that carries more than we unpacked is not what it
//! claims to be. Reading to the end also makes the decoder check its own trailer (CRC,
//! trailing garbage). A stream that ends inside a header or a file's data is truncated,
//! and an error. One that ends on a header boundary without the marker is extracted, as
//! GNU tar does, and reported in [`ExtractStats::ended_without_marker`]: whether that is
//! acceptable depends on what else proves the stream complete, which the pipeline knows
//! (a compressed stream's trailer, an md5) and this module does not.
//!
//! # Free space
//!
//! The reserve (`Limits::min_free_bytes`) is checked before the first entry and then
//! again whenever the bytes handed on for writing reach the next check point, including
//! between the chunks of one large file: each check puts the next one at half the
//! headroom it found (free space minus the reserve minus what the writers still hold
//! queued), at most 64 MiB away. So the headroom halves at worst between checks and the
//! extraction stops with "not enough free space" before the filesystem passes the
//! reserve (the blob written beside the tree in the pipeline included, as long as it
//! grows no faster than the tree).
//!
//! Any error names the entry; the caller deletes the staging dir, so nothing is published.

mod policy;
mod tree;
mod writer;

use std::collections::HashSet;
use std::ffi::CString;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::tar::{self, Mtime};
use policy::{reject, Planned, RelPath, What};
use tree::{cstring, Dir, Owner, ResolveError, Tree};
use writer::{io_error, read_error, xattr_error, FileMeta, Key, Pool, SMALL_FILE};

pub use policy::NAME_MAX;
pub use writer::Writers;

/// Buffer between the decoder and the tar reader: tar reads 512-byte headers, and each
/// decoder call has a fixed cost, so headers are served from here.
const TAR_BUFFER: usize = 256 * 1024;

/// Free space is re-checked at least every time this many bytes have been handed on.
const SPACE_CHECK_EVERY: u64 = 64 * 1024 * 1024;

/// How the archive's entries are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An app build: PEP 706 `data` rules, everything owned by `uid:gid`.
    Build { uid: u32, gid: u32 },
    /// An OS image: containerd rules, in-root resolution, owners and modes kept.
    Image,
}

/// Resource limits. The defaults are generous: far above any real build or image, low
/// enough that a hostile archive cannot fill the disk or memory before it is stopped.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of file content (the data a sparse file really holds, not its length), plus
    /// anything decoded after the end marker. Default 64 GiB.
    pub max_bytes: u64,
    /// Entries of any kind. Default 2 million (a large distro image has ~100k).
    pub max_entries: u64,
    /// Components in a path. Default 256.
    pub max_depth: usize,
    /// Bytes in a path or link target. Default 4096 (Linux `PATH_MAX`).
    pub max_path_len: usize,
    /// Bytes of tar metadata for one entry (PAX records, GNU long names, sparse maps),
    /// which the reader holds in memory; also the limit of one PAX global header.
    /// Default 1 MiB.
    pub max_metadata_bytes: u64,
    /// Free space to leave on the destination filesystem, checked before and during
    /// extraction; 0 turns the check off (the filesystem's own ENOSPC still stops it).
    /// Default 16 MiB.
    pub min_free_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 30,
            max_entries: 2_000_000,
            max_depth: 256,
            max_path_len: 4096,
            max_metadata_bytes: 1 << 20,
            min_free_bytes: 16 << 20,
        }
    }
}

/// What an extraction did.
#[derive(Debug, Clone, Default)]
pub struct ExtractStats {
    /// Entries read (of any kind, skipped ones included).
    pub entries: u64,
    pub files: u64,
    /// Directory entries (implicit parents not counted).
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Bytes of file content written (for sparse files, their data, not their holes).
    pub bytes: u64,
    /// Regular files written with holes.
    pub sparse_files: u64,
    /// Character/block devices and fifos skipped (images only; the caller tells the user).
    pub skipped_devices: u64,
    /// Extended attributes set (images).
    pub xattrs: u64,
    /// Extended attributes not set: every one in a build.
    pub dropped_xattrs: u64,
    /// POSIX ACLs not set (`SCHILY.acl.*` records, `system.posix_acl_*` xattrs).
    pub dropped_acls: u64,
    /// When the first regular file was complete on disk.
    pub first_file_done: Option<Instant>,
    /// The archive ended after this entry without its end-of-archive blocks (GNU tar
    /// accepts that silently). The caller decides whether the stream is proven complete
    /// otherwise (a compressed stream's own end check, an md5).
    pub ended_without_marker: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("cannot open extraction directory {path}: {source}")]
    Dest { path: PathBuf, source: io::Error },
    #[error("entry {entry}: {reason}")]
    Rejected { entry: String, reason: String },
    #[error("entry {entry}: cannot {op}: {source}")]
    Io {
        entry: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("reading the archive after entry {after}: {source}")]
    Read { after: String, source: io::Error },
    #[error("archive is truncated at entry {entry}")]
    Truncated { entry: String },
    #[error("archive ends without an end-of-archive marker (after entry {after})")]
    NoEndMarker { after: String },
    #[error("entry {entry}: archive exceeds the {what} limit of {limit}")]
    Limit {
        entry: String,
        what: &'static str,
        limit: u64,
    },
    #[error("junk after the end of the tar archive at byte {offset} of the decompressed stream")]
    JunkAfterEnd { offset: u64 },
    #[error("not enough free space in {path}: {free} bytes left, keeping at least {reserve} free")]
    NoSpace {
        path: PathBuf,
        free: u64,
        reserve: u64,
    },
    /// A writer stopped because another part failed; never returned to callers.
    #[error("extraction aborted")]
    Aborted,
}

impl From<tar::Error> for ExtractError {
    fn from(e: tar::Error) -> Self {
        match e {
            tar::Error::Invalid { entry, reason } => ExtractError::Rejected { entry, reason },
            tar::Error::Truncated { entry } => ExtractError::Truncated { entry },
            tar::Error::NoEndMarker { after } => ExtractError::NoEndMarker { after },
            tar::Error::MetadataLimit { entry, limit } => ExtractError::Limit {
                entry,
                what: "tar metadata size",
                limit,
            },
            tar::Error::Read { after, source } => read_error(source, &after),
        }
    }
}

/// Extract a tar stream into `dest` (an existing, empty staging directory).
pub fn extract(
    tar_stream: impl Read,
    dest: &Path,
    mode: Mode,
    limits: &Limits,
) -> Result<ExtractStats, ExtractError> {
    extract_with(tar_stream, dest, mode, limits, Writers::default())
}

/// [`extract`] with an explicit choice of writer threads (benches, diagnosis).
pub fn extract_with(
    tar_stream: impl Read,
    dest: &Path,
    mode: Mode,
    limits: &Limits,
    writers: Writers,
) -> Result<ExtractStats, ExtractError> {
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
    let mut ex = Extraction {
        tree,
        mode,
        limits: limits.clone(),
        me,
        pool,
        space,
        stats: ExtractStats::default(),
        dirs: Vec::new(),
        known_dirs: HashSet::new(),
        links: HashSet::new(),
    };
    let reader = tar::Reader::new(
        BufReader::with_capacity(TAR_BUFFER, tar_stream),
        limits.max_metadata_bytes,
    );
    let result = ex.run(reader);
    if let Err(e) = result {
        ex.pool.abort();
        return Err(e);
    }
    ex.pool.finish()?;
    ex.stats.first_file_done = ex.pool.first_file_done;
    ex.apply_dir_metadata()?;
    Ok(ex.stats)
}

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

struct Extraction {
    tree: Tree,
    mode: Mode,
    limits: Limits,
    me: Owner,
    pool: Pool,
    space: Space,
    stats: ExtractStats,
    dirs: Vec<DirMeta>,
    /// Names we made directories (so a later non-directory knows to remove them).
    known_dirs: HashSet<Key>,
    /// Names we made symlinks or hard links. The directory cache may hold paths resolved
    /// through such a name (images follow symlinks), so replacing one flushes the cache.
    links: HashSet<Key>,
}

impl Extraction {
    fn run<R: Read>(&mut self, mut reader: tar::Reader<R>) -> Result<(), ExtractError> {
        self.space.check(0, 0)?;
        let mut last = String::from("(none: at the start)");
        while let Some(entry) = reader.next_entry()? {
            self.stats.entries += 1;
            last = entry.name();
            if self.stats.entries > self.limits.max_entries {
                return Err(ExtractError::Limit {
                    entry: last,
                    what: "entry count",
                    limit: self.limits.max_entries,
                });
            }
            let planned = policy::plan(&entry, self.mode, &self.limits)?;
            self.entry(planned, &mut reader.data())?;
        }
        if reader.ended_without_marker() {
            self.stats.ended_without_marker = Some(last.clone());
        }
        let offset = reader.position();
        self.check_rest(reader.into_inner(), offset, &last)
    }

    /// After the end marker: only zeros may follow, and they count toward `max_bytes`.
    fn check_rest(
        &mut self,
        mut rest: impl Read,
        mut offset: u64,
        last: &str,
    ) -> Result<(), ExtractError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut trailing = 0u64;
        loop {
            let n = match rest.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e, last)),
            };
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Err(ExtractError::JunkAfterEnd {
                    offset: offset + i as u64,
                });
            }
            offset += n as u64;
            trailing += n as u64;
            self.check_bytes(trailing, last)?;
        }
    }

    fn check_bytes(&self, more: u64, entry: &str) -> Result<(), ExtractError> {
        if self.stats.bytes.saturating_add(more) > self.limits.max_bytes {
            return Err(ExtractError::Limit {
                entry: entry.to_string(),
                what: "total size",
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    fn entry(&mut self, p: Planned, data: &mut dyn Read) -> Result<(), ExtractError> {
        self.stats.dropped_xattrs += p.dropped_xattrs;
        self.stats.dropped_acls += p.dropped_acls;
        match &p.what {
            What::File { .. } => self.file(p, data),
            What::Dir => self.directory(&p),
            What::Symlink { .. } => self.symlink(&p),
            What::HardLink { .. } => self.hardlink(&p),
            What::SkippedDevice => {
                self.stats.skipped_devices += 1;
                Ok(())
            }
        }
    }

    /// The owner to set on a new entry, or `None` if creating it as us already gives it.
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

    fn file(&mut self, p: Planned, data: &mut dyn Read) -> Result<(), ExtractError> {
        let What::File {
            size,
            data_len,
            ref sparse,
        } = p.what
        else {
            unreachable!("file() is only called for files");
        };
        self.check_bytes(data_len, &p.entry)?;
        let upcoming = if data_len <= SMALL_FILE && sparse.is_none() {
            data_len
        } else {
            0
        };
        self.space.check(upcoming, self.pool.queued())?;
        let (dir, name, key) = self.parent(&p)?;
        let replaces_link = self.links.contains(&key);
        self.clear_dir_at(&dir, &name, &key, &p.entry)?;
        let meta = FileMeta {
            dir,
            name,
            perm: p.perm,
            chown: self.owner_for(&p),
            mtime: p.mtime,
            size: data_len,
            xattrs: self.xattrs(&p)?,
            entry: p.entry.clone(),
        };
        self.stats.xattrs += meta.xattrs.len() as u64;
        let space = &mut self.space;
        let mut reserve = |n, queued| space.check(n, queued);
        match sparse {
            Some(segments) => {
                self.pool.settle(&key)?;
                self.pool
                    .sparse_file(meta, segments, size, data, &mut reserve)?;
                self.stats.sparse_files += 1;
            }
            None => self.pool.file(meta, key, data, &mut reserve)?,
        }
        if replaces_link {
            // The writer replaces the link; until it has, a walk would still follow it.
            self.pool.drain()?;
            self.tree.flush();
        }
        self.stats.files += 1;
        self.stats.bytes += data_len;
        Ok(())
    }

    fn directory(&mut self, p: &Planned) -> Result<(), ExtractError> {
        self.stats.dirs += 1;
        let xattrs = self.xattrs(p)?;
        self.stats.xattrs += xattrs.len() as u64;
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

    fn symlink(&mut self, p: &Planned) -> Result<(), ExtractError> {
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
        self.stats.xattrs += xattrs.len() as u64;
        tree::utimensat_nofollow(fd, &name, p.mtime)
            .map_err(|e| io_error(&p.entry, "set mtime of", e))?;
        self.links.insert(key);
        self.stats.symlinks += 1;
        Ok(())
    }

    fn hardlink(&mut self, p: &Planned) -> Result<(), ExtractError> {
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
        self.stats.hardlinks += 1;
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

fn resolve_err(entry: &str, e: ResolveError) -> ExtractError {
    match e {
        ResolveError::Io(op, _, source) => ExtractError::Io {
            entry: entry.to_string(),
            op,
            source,
        },
        e => reject(entry, &e.to_string()),
    }
}
