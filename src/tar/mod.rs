//! vrun's tar reader: a stream of fully resolved entries, and nothing else.
//!
//! # Why our own reader
//!
//! What GNU tar 1.34 extracts is the reference (`tests/tar-verdicts.md`): an entry vrun sees that
//! `tar -t` does not, or the reverse, is a parser differential and a security bug. Every
//! differential found against GNU tar (issue 13) lived in header parsing, in the `tar`
//! crate we used before: data read after directory, symlink and hard-link headers that
//! carry a size (an archive listed as `README` + `ok.txt` unpacked as `hidden.sh`); PAX
//! records split at newlines instead of by their length; an unterminated last record
//! accepted; PAX `mtime` ignored and negative base-256 numbers misread; signed checksums
//! and blank (all-NUL) size fields refused; PAX sparse files unpacked as their raw
//! `GNUSparseFile.0/…` form; old GNU sparse files expanded with zeros (a 173-byte
//! `.tar.gz` wrote 31 GB). Working around all of that from outside the crate means
//! re-parsing every header ourselves anyway, so the parsing is here, a few hundred
//! lines that follow GNU tar's `list.c`, `xheader.c` and `sparse.c` rule by rule.
//!
//! It costs nothing measurable: reading the plain tar of the bench build (262 MB, 12 643
//! entries, GNU headers) from memory, every header parsed and every byte of data read,
//! takes a median of 0.027 s with this reader and 0.028 s with the `tar` crate
//! (`VRUN_BENCH_ONESHOT=21 cargo bench --bench tarparse`, 21 alternating rounds, load
//! average 4–6 on the shared 2-core machine) — both are a memcpy of the data; gzip
//! decoding of the same tar takes 0.38 s.
//!
//! # Shape
//!
//! [`Reader::next_entry`] folds every extension header (PAX `x`/`g`, GNU `L`/`K`, old
//! GNU sparse extension blocks, the PAX 1.0 sparse map, GNU `V` volume labels) into one
//! [`Entry`] with its final path, link target, type, mode, owner, mtime (with
//! nanoseconds), size, xattrs and sparse map; [`Reader::data`] then reads that entry's
//! stored bytes (for a sparse file: the segments' data, one after the other). The reader
//! knows nothing about where entries go: the directory writer (`extract`) and any other
//! sink take the same entries through the same policy.
//!
//! # Rules
//!
//! - No data follows types `1` (hard link) and `5` (directory), whatever their size
//!   field, as GNU tar reads them in every mode. For `2`, `3`, `4`, `6` and a regular
//!   file whose name ends in `/`, GNU tar's `-x` reads no data but its `-t` skips the
//!   size: such a header with a non-zero size is refused, as is a hard link given a
//!   PAX `size`.
//! - PAX records: by length (values may hold newlines and NULs), globals (`g`) applied
//!   before each entry's own, the last of a key wins; malformed records refused. A
//!   global header setting `path`, `linkpath`, `size` or `GNU.sparse.*` is refused (GNU
//!   tar would apply it to every later entry; nobody writes that).
//! - Two `x`, two `L` or two `K` headers for one entry, or a GNU long name and a PAX
//!   `path` that disagree, are refused: readers differ on which one wins.
//! - Sparse files: see `sparse`. GNU sparse headers are honoured only in GNU-format
//!   headers, PAX `GNU.sparse.*` records only in POSIX ones, as GNU tar does; the
//!   other combinations, which GNU tar extracts raw and others expand, are refused.
//! - `V` labels are skipped; `M` (multi-volume), star sparse and unknown types refused.
//! - Every metadata body (PAX, long names, sparse maps, dumpdirs, labels) is read into
//!   memory under one limit per entry, so a hostile header cannot take memory.

mod header;
mod pax;
mod sparse;

use std::io::{self, Read};

pub use header::Format;
pub use sparse::Segment;

use header::{at, Block, BLOCK};

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// A modification time: seconds since the epoch (negative before 1970) and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mtime {
    pub secs: i64,
    pub nanos: u32,
}

/// One fully resolved archive entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The name as archived (after long names and PAX records), trailing `/` kept.
    pub path: Vec<u8>,
    /// Symlink or hard-link target (empty for other kinds).
    pub link: Vec<u8>,
    pub kind: Kind,
    /// The 12 permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    pub mtime: Mtime,
    /// Device numbers of character and block devices.
    pub device: (u32, u32),
    /// Length of the file once extracted (regular files; 0 for the others).
    pub size: u64,
    /// Bytes [`Reader::data`] yields: `size`, or for a sparse file the data of its segments.
    pub data_len: u64,
    /// Where the data goes, for a sparse file (holes everywhere else).
    pub sparse: Option<Vec<Segment>>,
    /// `SCHILY.xattr.*` records (name without the prefix, raw value), last one per name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// `SCHILY.acl.*` records (access/default ACL texts), which have no xattr form here.
    pub acls: u32,
    /// The header's dialect.
    pub format: Format,
    /// Offset of the entry's first header (its first extension header, if any).
    pub offset: u64,
}

impl Entry {
    /// The name for messages.
    pub fn name(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// Why the archive cannot be read. Every variant names the entry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("entry {entry}: {reason}")]
    Invalid { entry: String, reason: String },
    #[error("archive is truncated at entry {entry}")]
    Truncated { entry: String },
    #[error("archive ends without an end-of-archive marker (after entry {after})")]
    NoEndMarker { after: String },
    #[error("entry {entry}: tar metadata (extended headers, long names, sparse maps) exceeds the limit of {limit} bytes")]
    MetadataLimit { entry: String, limit: u64 },
    #[error("reading the archive after entry {after}")]
    Read {
        after: String,
        #[source]
        source: io::Error,
    },
}

/// Extension headers seen before an entry's own header.
#[derive(Default)]
struct Pending {
    pax: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    /// Metadata bytes read into memory for this entry.
    meta: u64,
    /// Offset of the first extension header.
    start: Option<u64>,
}

impl Pending {
    fn any(&self) -> bool {
        self.pax.is_some() || self.long_name.is_some() || self.long_link.is_some()
    }
}

/// What the PAX records (global, then the entry's own) say.
#[derive(Default)]
struct Overrides {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    mtime: Option<Mtime>,
    uid: Option<u32>,
    gid: Option<u32>,
    uname: Option<Vec<u8>>,
    gname: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    acls: u32,
    /// Any `GNU.sparse.*` record.
    sparse_any: bool,
    sparse_name: Option<Vec<u8>>,
    sparse_major: Option<u64>,
    sparse_minor: Option<u64>,
    real_size: Option<u64>,
    map: sparse::PaxMap,
}

/// Reads entries from a tar stream (already decompressed).
pub struct Reader<R> {
    inner: R,
    pos: u64,
    /// Unread bytes of the current entry's data, then of its padding.
    data_left: u64,
    skip_left: u64,
    max_metadata: u64,
    globals: Vec<pax::Record>,
    last: String,
    /// Entries returned so far.
    returned: u64,
    done: bool,
    /// See [`Reader::ended_without_marker`].
    unterminated: bool,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK as u64) * BLOCK as u64
}

impl<R: Read> Reader<R> {
    /// `max_metadata`: bytes of extension data one entry may carry.
    pub fn new(inner: R, max_metadata: u64) -> Reader<R> {
        Reader {
            inner,
            pos: 0,
            data_left: 0,
            skip_left: 0,
            max_metadata,
            globals: Vec::new(),
            last: "(none: at the start)".to_string(),
            returned: 0,
            done: false,
            unterminated: false,
        }
    }

    /// The stream ended at a header boundary after at least one entry, without the
    /// end-of-archive blocks. GNU tar extracts such an archive silently (old writers and
    /// cut downloads both make them); whether that is acceptable depends on what else
    /// proves the stream complete, so the reader reports it and the caller decides.
    pub fn ended_without_marker(&self) -> bool {
        self.unterminated
    }

    /// Bytes of the stream consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The stream after the first end-of-archive block (once `next_entry` returned `None`).
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The current entry's data (see [`Entry::data_len`]). A stream that ends early gives
    /// an `UnexpectedEof` error.
    pub fn data(&mut self) -> Data<'_, R> {
        Data { r: self }
    }

    fn read_err(&self, source: io::Error) -> Error {
        Error::Read {
            after: self.last.clone(),
            source,
        }
    }

    /// Fill `buf` completely; `Ok(false)` if the stream ended before its first byte,
    /// `Err(None)` if it ended after (the caller names the entry).
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, Option<Error>> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(None),
                Ok(n) => {
                    got += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Some(self.read_err(e))),
            }
        }
        Ok(true)
    }

    /// Fill `buf` completely or fail, naming `entry` if the stream ends.
    fn fill_all(&mut self, buf: &mut [u8], entry: &str) -> Result<(), Error> {
        match self.fill(buf) {
            Ok(true) => Ok(()),
            Ok(false) if buf.is_empty() => Ok(()),
            Ok(false) | Err(None) => Err(Error::Truncated {
                entry: entry.to_string(),
            }),
            Err(Some(e)) => Err(e),
        }
    }

    /// Skip `n` bytes; `Err(None)` if the stream ends first.
    fn skip(&mut self, mut n: u64) -> Result<(), Option<Error>> {
        let mut buf = [0u8; 8 * BLOCK];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(None),
                Ok(k) => {
                    n -= k as u64;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Some(self.read_err(e))),
            }
        }
        Ok(())
    }

    fn skip_named(&mut self, n: u64, entry: &str) -> Result<(), Error> {
        self.skip(n).map_err(|e| {
            e.unwrap_or_else(|| Error::Truncated {
                entry: entry.to_string(),
            })
        })
    }

    /// A metadata body of `size` bytes (and its padding), counted against the limit.
    fn body(&mut self, size: u64, meta: &mut u64, name: &str) -> Result<Vec<u8>, Error> {
        *meta = meta.saturating_add(size);
        if *meta > self.max_metadata {
            return Err(Error::MetadataLimit {
                entry: name.to_string(),
                limit: self.max_metadata,
            });
        }
        let mut v = vec![0u8; size as usize];
        self.fill_all(&mut v, name)?;
        self.skip_named(padded(size) - size, name)?;
        Ok(v)
    }

    /// The next entry, or `None` after the end-of-archive block.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, Error> {
        loop {
            if self.done {
                return Ok(None);
            }
            let rest = self.data_left + self.skip_left;
            self.data_left = 0;
            self.skip_left = 0;
            if let Err(e) = self.skip(rest) {
                return Err(e.unwrap_or_else(|| Error::Truncated {
                    entry: self.last.clone(),
                }));
            }
            if let Some(e) = self.one()? {
                self.last = e.name();
                self.returned += 1;
                return Ok(Some(e));
            }
        }
    }

    /// Read headers up to one entry; `Ok(None)` for a skipped one (a volume label) or the end.
    fn one(&mut self) -> Result<Option<Entry>, Error> {
        let mut ext = Pending::default();
        let mut block: Block = [0; BLOCK];
        loop {
            let at_pos = self.pos;
            let here = |r: &Self| match r.returned {
                0 => format!("at byte {at_pos} (the first header)"),
                _ => format!("at byte {at_pos} (after {})", r.last),
            };
            let full = match self.fill(&mut block) {
                Ok(full) => full,
                Err(None) => return Err(Error::Truncated { entry: here(self) }),
                Err(Some(e)) => return Err(e),
            };
            if !full {
                if ext.any() {
                    return Err(Error::Truncated { entry: here(self) });
                }
                if self.returned == 0 {
                    return Err(Error::NoEndMarker {
                        after: self.last.clone(),
                    });
                }
                self.unterminated = true;
                self.done = true;
                return Ok(None);
            }
            if header::is_zero(&block) {
                if ext.any() {
                    return Err(Error::Invalid {
                        entry: here(self),
                        reason: "an extended header (PAX or GNU long name) is followed by \
                                 the end of the archive, not by an entry"
                            .into(),
                    });
                }
                self.done = true;
                return Ok(None);
            }
            if !header::checksum_ok(&block) {
                return Err(Error::Invalid {
                    entry: here(self),
                    reason: "header checksum mismatch (not a tar header, or a corrupt one)".into(),
                });
            }
            let typeflag = block[at::TYPEFLAG];
            if typeflag != b'g' {
                ext.start.get_or_insert(at_pos);
            }
            if !matches!(typeflag, b'x' | b'X' | b'g' | b'L' | b'K') {
                let entry = self.entry(&block, ext)?;
                if let Some(e) = &entry {
                    self.data_left = e.data_len;
                }
                return Ok(entry);
            }
            // Extension headers only from here: their name is for messages.
            let hname = lossy(header::cstr(&block[at::NAME]));
            let size = self.number(&block, at::SIZE, "size", &hname, 0, i64::MAX.into())? as u64;
            match typeflag {
                b'x' | b'X' => {
                    if ext.pax.is_some() {
                        return Err(self.invalid(&hname, "two PAX extended headers for one entry"));
                    }
                    ext.pax = Some(self.body(size, &mut ext.meta, &hname)?);
                }
                b'g' => {
                    let mut meta = 0;
                    let body = self.body(size, &mut meta, &hname)?;
                    let records = pax::parse(&body).map_err(|r| self.invalid(&hname, &r))?;
                    for r in &records {
                        let k = r.key.as_slice();
                        if matches!(k, b"path" | b"linkpath" | b"size")
                            || k.starts_with(b"GNU.sparse.")
                        {
                            return Err(self.invalid(
                                &hname,
                                &format!(
                                    "PAX global header sets `{}`, which GNU tar applies to \
                                     every later entry",
                                    lossy(k)
                                ),
                            ));
                        }
                    }
                    self.globals = records;
                }
                _ => {
                    let slot = if typeflag == b'L' {
                        &mut ext.long_name
                    } else {
                        &mut ext.long_link
                    };
                    if slot.is_some() {
                        let what = if typeflag == b'L' { "name" } else { "link" };
                        return Err(self.invalid(
                            &hname,
                            &format!("two GNU long {what} headers for one entry"),
                        ));
                    }
                    let body = self.body(size, &mut ext.meta, &hname)?;
                    let v = header::cstr(&body).to_vec();
                    if typeflag == b'L' {
                        ext.long_name = Some(v);
                    } else {
                        ext.long_link = Some(v);
                    }
                }
            }
        }
    }

    fn invalid(&self, entry: &str, reason: &str) -> Error {
        Error::Invalid {
            entry: entry.to_string(),
            reason: reason.to_string(),
        }
    }

    fn number(
        &self,
        b: &Block,
        field: std::ops::Range<usize>,
        what: &str,
        entry: &str,
        min: i128,
        max: i128,
    ) -> Result<i128, Error> {
        let f = &b[field];
        let v = header::parse(f, false).map_err(|e| {
            self.invalid(
                entry,
                &format!(
                    "bad {what} field `{}`: {e}",
                    f.iter()
                        .map(|&c| std::ascii::escape_default(c).to_string())
                        .collect::<String>()
                ),
            )
        })?;
        if !(min..=max).contains(&v) {
            return Err(self.invalid(entry, &format!("{what} {v} is out of range")));
        }
        Ok(v)
    }

    /// Resolve the entry whose own header is `b`; `None` for a skipped volume label.
    fn entry(&mut self, b: &Block, ext: Pending) -> Result<Option<Entry>, Error> {
        let format = Format::detect(b, ext.pax.is_some());
        let header_name = header::name(b, format);
        let mut path = ext.long_name.clone().unwrap_or_else(|| header_name.clone());
        let shown = lossy(&path);
        let typeflag = b[at::TYPEFLAG];
        let u32_max = i128::from(u32::MAX);
        let mode = self.number(b, at::MODE, "mode", &shown, 0, u64::MAX.into())? as u32 & 0o7777;
        let mut uid = self.number(b, at::UID, "uid", &shown, 0, u32_max)? as u32;
        let mut gid = self.number(b, at::GID, "gid", &shown, 0, u32_max)? as u32;
        let secs = self.number(
            b,
            at::MTIME,
            "mtime",
            &shown,
            i64::MIN.into(),
            i64::MAX.into(),
        )?;
        let mut mtime = Mtime {
            secs: secs as i64,
            nanos: 0,
        };
        // GNU tar never reads a hard link's size field ("links 0 size on tape").
        let mut stored = if typeflag == b'1' {
            0
        } else {
            self.number(b, at::SIZE, "size", &shown, 0, i64::MAX.into())? as u64
        };
        let mut uname = header::cstr(&b[at::UNAME]).to_vec();
        let mut gname = header::cstr(&b[at::GNAME]).to_vec();
        let mut link = ext
            .long_link
            .clone()
            .unwrap_or_else(|| header::cstr(&b[at::LINKNAME]).to_vec());
        let mut device = (0, 0);
        if matches!(typeflag, b'3' | b'4') && format != Format::V7 {
            device = (
                self.number(b, at::DEVMAJOR, "devmajor", &shown, 0, u32_max)? as u32,
                self.number(b, at::DEVMINOR, "devminor", &shown, 0, u32_max)? as u32,
            );
        }

        let mut x = Overrides::default();
        let globals = std::mem::take(&mut self.globals);
        let own = match &ext.pax {
            Some(body) => pax::parse(body).map_err(|r| self.invalid(&shown, &r)),
            None => Ok(Vec::new()),
        };
        let applied = own.and_then(|own| {
            for r in globals.iter().chain(own.iter()) {
                apply(&mut x, r).map_err(|reason| self.invalid(&shown, &reason))?;
            }
            x.map
                .finish()
                .map_err(|reason| self.invalid(&shown, &reason))
        });
        self.globals = globals;
        applied?;

        // Names: GNU.sparse.name, then PAX path, then the GNU long name or the header.
        let pax_path = x.sparse_name.clone().or_else(|| x.path.clone());
        if let Some(p) = pax_path {
            if let Some(long) = &ext.long_name {
                if *long != p {
                    return Err(self.invalid(
                        &lossy(&p),
                        &format!(
                            "PAX path `{}` and GNU long name `{}` disagree",
                            lossy(&p),
                            lossy(long)
                        ),
                    ));
                }
            }
            path = p;
        }
        if let Some(l) = x.linkpath.take() {
            if let Some(long) = &ext.long_link {
                if *long != l {
                    return Err(self.invalid(
                        &lossy(&path),
                        &format!(
                            "PAX linkpath `{}` and GNU long link `{}` disagree",
                            lossy(&l),
                            lossy(long)
                        ),
                    ));
                }
            }
            link = l;
        }
        let name = lossy(&path);
        let refuse = |reason: String| Error::Invalid {
            entry: name.clone(),
            reason,
        };
        for v in [&path, &link] {
            if v.contains(&0) {
                return Err(refuse("PAX path or linkpath contains a NUL byte".into()));
            }
        }
        let pax_size = x.size;
        if let Some(s) = pax_size {
            stored = s;
        }
        if let Some(t) = x.mtime {
            mtime = t;
        }
        uid = x.uid.unwrap_or(uid);
        gid = x.gid.unwrap_or(gid);
        uname = x.uname.take().unwrap_or(uname);
        gname = x.gname.take().unwrap_or(gname);
        let trailing_slash = path.len() > 1 && path.ends_with(b"/");

        let mut entry = Entry {
            path,
            link: Vec::new(),
            kind: Kind::File,
            mode,
            uid,
            gid,
            uname,
            gname,
            mtime,
            device,
            size: 0,
            data_len: 0,
            sparse: None,
            xattrs: std::mem::take(&mut x.xattrs),
            acls: x.acls,
            format,
            offset: ext.start.unwrap_or(0),
        };
        let no_data = |kind: &str| {
            if stored > 0 {
                Err(refuse(format!(
                    "{kind} carries a size of {stored} bytes (GNU tar's -x reads no data \
                     after it, its -t skips {stored} bytes: they disagree)"
                )))
            } else {
                Ok(())
            }
        };
        if x.sparse_any && !(typeflag == b'0' || typeflag == 0 || typeflag == b'7') {
            return Err(refuse(format!(
                "GNU.sparse records on a non-regular entry (type `{}`)",
                typeflag.escape_ascii()
            )));
        }
        match typeflag {
            b'0' | 0 | b'7' if trailing_slash => {
                no_data("a regular-file header whose name ends in `/`")?;
                entry.kind = Kind::Dir;
            }
            b'0' | 0 | b'7' if x.sparse_any => {
                self.pax_sparse(&mut entry, &mut x, stored, &ext)?;
                return Ok(Some(entry));
            }
            b'0' | 0 | b'7' => {
                entry.size = stored;
                entry.data_len = stored;
                self.skip_left = padded(stored) - stored;
            }
            b'S' => {
                if format != Format::Gnu {
                    return Err(refuse(format!(
                        "GNU sparse entry in a {} header (GNU tar extracts it unexpanded)",
                        format.as_str()
                    )));
                }
                self.gnu_sparse(&mut entry, b, stored, ext.meta)?;
                return Ok(Some(entry));
            }
            b'1' => {
                if pax_size.is_some_and(|s| s > 0) {
                    return Err(refuse(format!(
                        "hard link with a PAX size of {stored} bytes (GNU tar's -x reads no \
                         data after it, its -t skips it: they disagree)"
                    )));
                }
                entry.kind = Kind::HardLink;
                entry.link = link;
            }
            b'2' => {
                no_data("a symlink header")?;
                entry.kind = Kind::Symlink;
                entry.link = link;
            }
            b'3' | b'4' | b'6' => {
                no_data("a device or fifo header")?;
                entry.kind = match typeflag {
                    b'3' => Kind::CharDevice,
                    b'4' => Kind::BlockDevice,
                    _ => Kind::Fifo,
                };
            }
            b'5' => entry.kind = Kind::Dir, // GNU tar reads no data after a directory, ever.
            b'D' => {
                // GNU incremental dumpdir: a directory whose data lists its contents.
                let mut meta = ext.meta;
                self.body(stored, &mut meta, &name)?;
                entry.kind = Kind::Dir;
            }
            b'V' => {
                let mut meta = ext.meta;
                self.body(stored, &mut meta, &name)?;
                return Ok(None);
            }
            b'M' => {
                return Err(refuse(
                    "multi-volume continuation entries are not supported".into(),
                ))
            }
            other => {
                return Err(refuse(format!(
                    "unsupported entry type `{}`",
                    other.escape_ascii()
                )))
            }
        }
        Ok(Some(entry))
    }

    /// Old GNU sparse (`S`): the map in the header and its extension blocks.
    fn gnu_sparse(
        &mut self,
        e: &mut Entry,
        b: &Block,
        stored: u64,
        mut meta: u64,
    ) -> Result<(), Error> {
        let name = e.name();
        let real = self.number(
            b,
            at::GNU_REALSIZE,
            "sparse realsize",
            &name,
            0,
            i64::MAX.into(),
        )? as u64;
        let mut segments = Vec::new();
        let mut ended = false;
        slots(
            &b[at::GNU_SPARSE..at::GNU_ISEXTENDED],
            4,
            &mut segments,
            &mut ended,
        )
        .map_err(|r| self.invalid(&name, &r))?;
        let mut extended = b[at::GNU_ISEXTENDED] != 0;
        let mut ext: Block = [0; BLOCK];
        while extended {
            if ended {
                return Err(self.invalid(
                    &name,
                    "sparse map continues in an extension block after an empty slot (GNU \
                     tar would read that block as data)",
                ));
            }
            meta += BLOCK as u64;
            if meta > self.max_metadata {
                return Err(Error::MetadataLimit {
                    entry: name,
                    limit: self.max_metadata,
                });
            }
            self.fill_all(&mut ext, &name)?;
            slots(
                &ext[..at::EXT_ISEXTENDED],
                at::EXT_SLOTS,
                &mut segments,
                &mut ended,
            )
            .map_err(|r| self.invalid(&name, &r))?;
            extended = ext[at::EXT_ISEXTENDED] != 0;
        }
        sparse::validate(&segments, real, stored).map_err(|r| self.invalid(&name, &r))?;
        e.size = real;
        e.data_len = stored;
        e.sparse = Some(segments);
        self.skip_left = padded(stored) - stored;
        Ok(())
    }

    /// PAX sparse 0.0, 0.1 and 1.0.
    fn pax_sparse(
        &mut self,
        e: &mut Entry,
        x: &mut Overrides,
        stored: u64,
        ext: &Pending,
    ) -> Result<(), Error> {
        let name = e.name();
        if e.format != Format::Posix {
            return Err(self.invalid(
                &name,
                &format!(
                    "GNU.sparse records with a {} header (GNU tar extracts it unexpanded)",
                    e.format.as_str()
                ),
            ));
        }
        let version = (x.sparse_major.unwrap_or(0), x.sparse_minor.unwrap_or(0));
        let real = x.real_size.unwrap_or(stored);
        let (segments, data) = match version {
            (1, 0) => {
                // The map is at the start of the data, in whole blocks.
                let mut lines = sparse::MapLines::default();
                let mut meta = ext.meta;
                let mut used = 0u64;
                let mut block: Block = [0; BLOCK];
                loop {
                    used += BLOCK as u64;
                    meta += BLOCK as u64;
                    if used > padded(stored) {
                        return Err(self.invalid(&name, "sparse map runs past the entry's data"));
                    }
                    if meta > self.max_metadata {
                        return Err(Error::MetadataLimit {
                            entry: name,
                            limit: self.max_metadata,
                        });
                    }
                    self.fill_all(&mut block, &name)?;
                    if lines.feed(&block).map_err(|r| self.invalid(&name, &r))? {
                        break;
                    }
                }
                if used > stored {
                    return Err(self.invalid(&name, "sparse map runs past the entry's data"));
                }
                (lines.segments, stored - used)
            }
            (0, 0) | (0, 1) => {
                if x.map.capacity.is_none() && x.map.segments.is_empty() {
                    return Err(self.invalid(
                        &name,
                        "GNU.sparse records without a sparse map (GNU tar would read the \
                         file's real size from the archive)",
                    ));
                }
                (std::mem::take(&mut x.map.segments), stored)
            }
            (major, minor) => {
                return Err(
                    self.invalid(&name, &format!("unknown PAX sparse format {major}.{minor}"))
                )
            }
        };
        if segments.is_empty() && version.0 == 0 {
            // GNU tar: no segments and no major version = not a sparse file at all.
            return Err(self.invalid(
                &name,
                "GNU.sparse records with an empty map (GNU tar would read the file's real \
                 size from the archive)",
            ));
        }
        sparse::validate(&segments, real, data).map_err(|r| self.invalid(&name, &r))?;
        e.size = real;
        e.data_len = data;
        e.sparse = Some(segments);
        self.skip_left = padded(stored) - stored;
        Ok(())
    }
}

/// Old GNU sparse slots of one header or extension block; an empty slot ends the map.
fn slots(
    area: &[u8],
    n: usize,
    segments: &mut Vec<Segment>,
    ended: &mut bool,
) -> Result<(), String> {
    for i in 0..n {
        if *ended {
            break;
        }
        match sparse::gnu_slot(&area[i * 24..i * 24 + 24])? {
            None => *ended = true,
            Some(s) => segments.push(s),
        }
    }
    Ok(())
}

/// Apply one PAX record the way GNU tar's keyword table does.
fn apply(x: &mut Overrides, r: &pax::Record) -> Result<(), String> {
    let v = r.value.as_slice();
    let num = |min: i128, max: i128| pax::integer(&r.key, v, min, max);
    let u32_max = i128::from(u32::MAX);
    let off_max = i128::from(i64::MAX);
    match r.key.as_slice() {
        b"path" => x.path = Some(v.to_vec()),
        b"linkpath" => x.linkpath = Some(v.to_vec()),
        b"size" => x.size = Some(num(0, off_max)? as u64),
        b"mtime" => x.mtime = Some(pax::time(&r.key, v)?),
        b"atime" | b"ctime" => {
            pax::time(&r.key, v)?;
        }
        b"uid" => x.uid = Some(num(0, u32_max)? as u32),
        b"gid" => x.gid = Some(num(0, u32_max)? as u32),
        b"uname" => x.uname = Some(pax::c_string(v).to_vec()),
        b"gname" => x.gname = Some(pax::c_string(v).to_vec()),
        b"SCHILY.acl.access" | b"SCHILY.acl.default" => x.acls += 1,
        k if k.starts_with(b"GNU.sparse.") => {
            x.sparse_any = true;
            match k {
                b"GNU.sparse.name" => x.sparse_name = Some(v.to_vec()),
                b"GNU.sparse.major" => x.sparse_major = Some(num(0, u32_max)? as u64),
                b"GNU.sparse.minor" => x.sparse_minor = Some(num(0, u32_max)? as u64),
                b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                    x.real_size = Some(num(0, off_max)? as u64)
                }
                b"GNU.sparse.numblocks" => x.map.numblocks(num(0, off_max)? as u64),
                b"GNU.sparse.offset" => x.map.offset(num(0, off_max)? as u64)?,
                b"GNU.sparse.numbytes" => x.map.numbytes(num(0, off_max)? as u64)?,
                b"GNU.sparse.map" => x.map.map(v)?,
                other => return Err(format!("unknown PAX record {}", lossy(other))),
            }
        }
        k if k.starts_with(b"SCHILY.xattr") => {
            let Some(name) = k.strip_prefix(b"SCHILY.xattr.").filter(|n| !n.is_empty()) else {
                return Err(format!("malformed PAX xattr record `{}`", lossy(k)));
            };
            let name = pax::xattr_name(name);
            x.xattrs.retain(|(n, _)| *n != name);
            x.xattrs.push((name, v.to_vec()));
        }
        // comment, charset, hdrcharset, GNU.volume.*, GNU.dumpdir, LIBARCHIVE.*,
        // RHT.security.selinux and unknown keys: GNU tar ignores them when extracting
        // with --xattrs (SELinux contexts need --selinux), and so do we.
        _ => {}
    }
    Ok(())
}

/// The current entry's data, bounded by [`Entry::data_len`].
pub struct Data<'a, R> {
    r: &'a mut Reader<R>,
}

impl<R: Read> Read for Data<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.r.data_left;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(left.min(usize::MAX as u64) as usize);
        let n = self.r.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside an entry's data",
            ));
        }
        self.r.data_left -= n as u64;
        self.r.pos += n as u64;
        Ok(n)
    }
}
