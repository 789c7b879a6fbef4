//! The EROFS sink: planned entries streamed into one image file instead of a tree.
//!
//! The second [`Sink`]: the same reader, limits and policy decide every name, link, mode
//! and owner (a build's files are the proc user's, an image keeps its numbers) and what
//! is refused, and this sink hands the result to [`crate::erofs::ImageWriter`] — file
//! data appended to the image as it arrives, directories and inodes at the end, one
//! fsync. Nothing an archive names ever becomes a host path: there is no directory to
//! escape from, so the path attacks the directory sink defends against with `O_NOFOLLOW`
//! walks cannot happen here by construction.
//!
//! What must still match the directory sink exactly is what the *tree* looks like, and
//! that includes two things the writer does not know about:
//!
//! - **Paths through symlinks.** An image entry `bin/ls` after a symlink `bin -> usr/bin`
//!   lands in `usr/bin/` (the directory sink resolves every parent inside the root,
//!   absolute targets from the root, `..` stopping at it, at most 40 hops); in a build a
//!   symlink in a path is refused. This sink resolves parents the same way against the
//!   image being written ([`ImageWriter::child`]), remembering each symlink's target by
//!   its inode (so a hard link to a symlink is one too), and passes the writer resolved
//!   paths only. Missing parents are made on the way, as `mkdir` would, with the same
//!   0755 and owner; refusals carry the same messages.
//! - **What the staging dir was.** A build's tree lives under `app/` (0755, the proc
//!   user's), an image's at the root; both roots are 0755 root-owned until an archive's
//!   `./` entry says otherwise. [`ImageRoot`] says which.
//!
//! Free space: the image grows by the data it is given, so the reserve
//! (`Limits::min_free_bytes`) is checked as the directory sink checks it — before the
//! first entry, then whenever the data written reaches the next check point (half the
//! headroom found, at most 64 MiB on), between the chunks of one large file too.
//!
//! The writer's writeback kicks ([`WRITEBACK_EVERY`]) start the disk on the image while
//! the download goes on; [`ImageWriter::finish_hashed`] hashes the image (for
//! `layer.json`, `vrun cache verify --deep`) beside its one fsync.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::dir::resolve_err;
use super::policy::{reject, Planned, RelPath, What};
use super::tree::{follow_link, ResolveError};
use super::{io_error, read_error, ExtractError, Limits, Mode, Sink};
use crate::erofs::{
    DirId, Entry, EntryKind, ErofsError, Extent, ImageStats, ImageWriter, Metadata, Node,
    WriterOptions,
};

/// Symlinks followed while resolving one path before it is "too many levels" (Linux's
/// own limit, and the directory sink's).
const MAX_SYMLINK_HOPS: usize = 40;

/// Free space is re-checked at least every time this many bytes have been written.
const SPACE_CHECK_EVERY: u64 = 64 * 1024 * 1024;

/// Image bytes between two writeback kicks. Measured for the blob before issue 15 (with
/// `syncfs` kicks on the 262 MB / 12k-file gz bench build on loop ext4: 2, 4, 8 and
/// 32 MiB all cut `publish_s` from 1.2–1.4 s to 0.2–0.3 s; 8 MiB was best or tied);
/// the image is the same kind of one long sequential file.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Where the archive's root goes in the image.
#[derive(Debug, Clone)]
pub enum ImageRoot {
    /// At the image's root (an OS image).
    Top,
    /// In a directory `name` at the image's root, made first with `meta` (a build's
    /// `app/`, which the layer mounts at `/`).
    Under { name: Vec<u8>, meta: Metadata },
}

/// Writes entries into a new EROFS image file.
pub struct ErofsSink {
    writer: Option<ImageWriter>,
    path: PathBuf,
    follow_symlinks: bool,
    /// The directory archive paths are relative to, and its path in the image.
    base: DirId,
    base_path: Vec<u8>,
    /// Target of every symlink inode written (hard links to it share the inode).
    symlinks: HashMap<u32, Vec<u8>>,
    space: ImageSpace,
    first_file_done: Option<Instant>,
    entries_done: Option<Instant>,
    written: Option<(ImageStats, String)>,
}

impl ErofsSink {
    /// A sink writing a new image at `image` (which must not exist).
    pub fn create(
        image: &Path,
        mode: Mode,
        limits: &Limits,
        root: ImageRoot,
    ) -> Result<ErofsSink, ExtractError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // SAFETY: geteuid/getegid cannot fail.
        let me = unsafe { (libc::geteuid(), libc::getegid()) };
        // Parents an archive does not list are made as `mkdir` makes them: 0755, owned by
        // the proc user in a build, by us in an image; the root likewise, until `./`.
        let implicit = |(uid, gid): (u32, u32)| Metadata {
            mode: 0o755,
            uid,
            gid,
            mtime: now.as_secs() as i64,
            mtime_nsec: now.subsec_nanos(),
            xattrs: Vec::new(),
        };
        let (follow_symlinks, implicit_owner) = match mode {
            Mode::Build { uid, gid } => (false, (uid, gid)),
            Mode::Image => (true, me),
        };
        let opts = WriterOptions {
            implicit_dir: implicit(implicit_owner),
            writeback_every: Some(WRITEBACK_EVERY),
            ..WriterOptions::default()
        };
        let image_err = |e: ErofsError| ExtractError::Image {
            path: image.to_owned(),
            reason: crate::errors::chain(&e),
        };
        let mut writer = ImageWriter::create(image, opts).map_err(image_err)?;
        writer.add_dir(b"", &implicit(me)).map_err(image_err)?;
        let (base, base_path) = match root {
            ImageRoot::Top => (DirId::ROOT, Vec::new()),
            ImageRoot::Under { name, meta } => {
                writer.add_dir(&name, &meta).map_err(image_err)?;
                match writer.child(DirId::ROOT, &name) {
                    Some(Node::Dir(d)) => (d, name),
                    _ => unreachable!("just made"),
                }
            }
        };
        Ok(ErofsSink {
            writer: Some(writer),
            path: image.to_owned(),
            follow_symlinks,
            base,
            base_path,
            symlinks: HashMap::new(),
            space: ImageSpace {
                image: image.to_owned(),
                reserve: limits.min_free_bytes,
                written: 0,
                next_check: 0,
            },
            first_file_done: None,
            entries_done: None,
            written: None,
        })
    }

    /// When every entry had been given to the writer (before its directories, inodes and
    /// fsync), once [`Sink::finish`] ran.
    pub fn entries_done(&self) -> Option<Instant> {
        self.entries_done
    }

    /// After [`Sink::finish`]: what was written, and the image's sha256.
    pub fn written(&self) -> Option<&(ImageStats, String)> {
        self.written.as_ref()
    }

    fn writer(&mut self) -> Result<&mut ImageWriter, ExtractError> {
        let path = &self.path;
        self.writer.as_mut().ok_or_else(|| ExtractError::Image {
            path: path.clone(),
            reason: "already finished".into(),
        })
    }

    /// The directory `path` (relative to the base) names, resolved as the directory sink
    /// resolves it (see the module note), made when missing if `create`; with its path
    /// in the image.
    fn resolve(&mut self, path: &RelPath, create: bool) -> Result<(DirId, Vec<u8>), ResolveError> {
        let follow = self.follow_symlinks;
        let base = self.base;
        let mut stack: Vec<(DirId, Vec<u8>)> = Vec::new();
        let mut todo: Vec<Vec<u8>> = path.components().rev().map(<[u8]>::to_vec).collect();
        let mut hops = 0;
        let w = self.writer.as_mut().expect("resolve runs before finish");
        while let Some(comp) = todo.pop() {
            match comp.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    stack.pop();
                    continue;
                }
                _ => {}
            }
            let cur = stack.last().map_or(base, |d| d.0);
            match w.child(cur, &comp) {
                Some(Node::Dir(d)) => stack.push((d, comp)),
                None if create => {
                    let d = w.make_implicit_dir(cur, &comp).map_err(|_| {
                        ResolveError::Io(
                            "create directory",
                            comp.clone(),
                            io::Error::from_raw_os_error(libc::ENAMETOOLONG),
                        )
                    })?;
                    stack.push((d, comp));
                }
                None => {
                    return Err(ResolveError::Io(
                        "open",
                        comp,
                        io::Error::from_raw_os_error(libc::ENOENT),
                    ))
                }
                Some(Node::Inode(i)) => {
                    let Some(target) = self.symlinks.get(&i) else {
                        return Err(ResolveError::NotDir(comp));
                    };
                    if !follow {
                        return Err(ResolveError::Symlink(comp));
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(ResolveError::Loop);
                    }
                    follow_link(target, &mut stack, &mut todo);
                }
            }
        }
        let dir = stack.last().map_or(base, |d| d.0);
        let mut full = self.base_path.clone();
        for (_, name) in &stack {
            if !full.is_empty() {
                full.push(b'/');
            }
            full.extend_from_slice(name);
        }
        Ok((dir, full))
    }

    /// The image path of a new entry at `p.path` (parents resolved and made), with the
    /// directory holding it and its name there.
    fn place(&mut self, p: &Planned) -> Result<Placed, ExtractError> {
        if p.path.is_root() {
            return Ok((self.base_path.clone(), None));
        }
        let Some((parent, name)) = p.path.split_last() else {
            return Err(reject(&p.entry, "entry has an empty name"));
        };
        let name = name.to_vec();
        let (dir, mut full) = self
            .resolve(&parent, true)
            .map_err(|e| resolve_err(&p.entry, e))?;
        if !full.is_empty() {
            full.push(b'/');
        }
        full.extend_from_slice(&name);
        Ok((full, Some((dir, name))))
    }

    fn add(
        &mut self,
        p: &Planned,
        entry: &Entry<'_>,
        data: &mut dyn Read,
    ) -> Result<(), ExtractError> {
        let path = self.path.clone();
        let r = self.writer()?.add(entry, data);
        r.map_err(|e| writer_error(&path, &p.entry, e))
    }
}

/// A new entry's path in the image, and (unless it is the root) the directory holding
/// it and its name there.
type Placed = (Vec<u8>, Option<(DirId, Vec<u8>)>);

/// Metadata of a planned entry, as the writer stores it.
fn metadata(p: &Planned) -> Metadata {
    Metadata {
        mode: p.perm,
        uid: p.owner.0,
        gid: p.owner.1,
        mtime: p.mtime.secs,
        mtime_nsec: p.mtime.nanos,
        xattrs: p.xattrs.clone(),
    }
}

/// A writer error as the directory sink would have reported the same failure.
fn writer_error(image: &Path, entry: &str, e: ErofsError) -> ExtractError {
    match e {
        ErofsError::Invalid { reason, .. } => reject(entry, &reason.to_string()),
        ErofsError::Read { source, .. } => read_error(source, entry),
        ErofsError::ShortData { .. } => ExtractError::Truncated {
            entry: entry.to_string(),
        },
        ErofsError::Write { source, .. } => io_error(entry, "write the image of", source),
        e @ (ErofsError::Limit { .. } | ErofsError::Poisoned { .. }) => ExtractError::Image {
            path: image.to_owned(),
            reason: crate::errors::chain(&e),
        },
    }
}

impl Sink for ErofsSink {
    fn begin(&mut self) -> Result<(), ExtractError> {
        self.space.check(0)
    }

    fn file(&mut self, p: &Planned, data: &mut dyn Read) -> Result<(), ExtractError> {
        let What::File {
            size, ref sparse, ..
        } = p.what
        else {
            unreachable!("file() is only called for files");
        };
        let (path, _) = self.place(p)?;
        let meta = metadata(p);
        let extents: Option<Vec<Extent>> = sparse.as_ref().map(|segs| {
            segs.iter()
                .map(|s| Extent {
                    offset: s.offset,
                    len: s.len,
                })
                .collect()
        });
        let kind = match &extents {
            None => EntryKind::File { size },
            Some(extents) => EntryKind::SparseFile { size, extents },
        };
        let entry = Entry {
            path: &path,
            kind,
            meta: &meta,
        };
        let mut checked = SpaceChecked {
            inner: data,
            space: &mut self.space,
            stopped: None,
        };
        let path_err = self.path.clone();
        let w = self.writer.as_mut().expect("file runs before finish");
        let r = w.add(&entry, &mut checked);
        if let Some(e) = checked.stopped.take() {
            return Err(e);
        }
        r.map_err(|e| writer_error(&path_err, &p.entry, e))?;
        self.first_file_done.get_or_insert_with(Instant::now);
        Ok(())
    }

    fn dir(&mut self, p: &Planned) -> Result<(), ExtractError> {
        let (path, _) = self.place(p)?;
        let meta = metadata(p);
        let entry = Entry {
            path: &path,
            kind: EntryKind::Directory,
            meta: &meta,
        };
        self.add(p, &entry, &mut io::empty())
    }

    fn symlink(&mut self, p: &Planned) -> Result<(), ExtractError> {
        let What::Symlink { target } = &p.what else {
            unreachable!("symlink() is only called for symlinks");
        };
        let (path, at) = self.place(p)?;
        let meta = metadata(p);
        let entry = Entry {
            path: &path,
            kind: EntryKind::Symlink { target },
            meta: &meta,
        };
        self.add(p, &entry, &mut io::empty())?;
        let (dir, name) = at.expect("a symlink is never the root");
        if let Some(Node::Inode(i)) = self.writer()?.child(dir, &name) {
            self.symlinks.insert(i, target.clone());
        }
        Ok(())
    }

    fn hardlink(&mut self, p: &Planned) -> Result<(), ExtractError> {
        let What::HardLink { target, shown } = &p.what else {
            unreachable!("hardlink() is only called for hard links");
        };
        let missing = || {
            reject(
                &p.entry,
                &format!("hard link target `{shown}` does not exist"),
            )
        };
        let Some((tparent, tname)) = target.split_last() else {
            return Err(reject(&p.entry, "hard link with an empty target"));
        };
        let (tdir, mut tpath) = self.resolve(&tparent, false).map_err(|e| match e {
            ResolveError::Io(_, _, ref io) if io.kind() == io::ErrorKind::NotFound => missing(),
            e => resolve_err(&p.entry, e),
        })?;
        match self.writer()?.child(tdir, tname) {
            None => return Err(missing()),
            Some(Node::Dir(_)) => {
                return Err(reject(
                    &p.entry,
                    &format!("hard link target `{shown}` is a directory"),
                ))
            }
            Some(Node::Inode(_)) => {}
        }
        if !tpath.is_empty() {
            tpath.push(b'/');
        }
        tpath.extend_from_slice(tname);
        let (path, _) = self.place(p)?;
        let meta = Metadata::default();
        let entry = Entry {
            path: &path,
            kind: EntryKind::HardLink { target: &tpath },
            meta: &meta,
        };
        self.add(p, &entry, &mut io::empty())
    }

    fn finish(&mut self) -> Result<Option<Instant>, ExtractError> {
        self.entries_done = Some(Instant::now());
        let writer = self.writer.take().ok_or_else(|| ExtractError::Image {
            path: self.path.clone(),
            reason: "already finished".into(),
        })?;
        let written = writer.finish_hashed().map_err(|e| ExtractError::Image {
            path: self.path.clone(),
            reason: crate::errors::chain(&e),
        })?;
        self.written = Some(written);
        Ok(self.first_file_done)
    }

    fn abort(&mut self) {
        self.writer = None;
    }
}

/// The free-space reserve of the image's filesystem (see the module note).
struct ImageSpace {
    image: PathBuf,
    reserve: u64,
    /// Data bytes given to the writer so far.
    written: u64,
    next_check: u64,
}

impl ImageSpace {
    /// `more` data bytes are about to be written.
    fn check(&mut self, more: u64) -> Result<(), ExtractError> {
        self.written += more;
        if self.reserve == 0 || self.written < self.next_check {
            return Ok(());
        }
        let Ok(st) = nix::sys::statvfs::statvfs(&self.image) else {
            return Ok(()); // Not knowing is not a reason to fail; ENOSPC still is.
        };
        let free = st.blocks_available() * st.fragment_size();
        let need = self.reserve + more;
        if free < need {
            return Err(ExtractError::NoSpace {
                path: self.image.clone(),
                free,
                reserve: self.reserve,
            });
        }
        self.next_check = self.written + ((free - need) / 2).min(SPACE_CHECK_EVERY);
        Ok(())
    }
}

/// A file's data on its way into the image, the reserve checked as it goes; a stop is
/// kept here (the writer only sees an io error) and reported as itself.
struct SpaceChecked<'a> {
    inner: &'a mut dyn Read,
    space: &'a mut ImageSpace,
    stopped: Option<ExtractError>,
}

impl Read for SpaceChecked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Err(e) = self.space.check(n as u64) {
            self.stopped = Some(e);
            return Err(io::Error::other("not enough free space"));
        }
        Ok(n)
    }
}
