//! The manifest of a layer: one line per entry of the extracted tree (type, mode, owner,
//! size, sha256 of regular files or target of symlinks, path), written at publish time so
//! `vrun cache verify --deep` can prove a layer is still what was extracted.
//!
//! It is produced by walking the staging dir just before the publishing rename, when
//! every file is still in the page cache: the walk costs one `lstat` per entry plus a
//! sha256 pass over the bytes at memory speed (sha2 uses the CPU's SHA extensions when
//! present). That is measurably cheaper than any disk work of the extraction itself (see
//! the crate's bench figures in the report); hashing inside the extractor would save the
//! second read but tie the store to one extractor.
//!
//! Format (`manifest-v1.tsv`): a header line, then tab-separated
//! `kind mode uid gid size content path`, sorted by path. `kind` is `d f l c b p s`;
//! `mode` is octal permission bits; `content` is the sha256 for `f` (or `-` in a
//! shallow manifest, see [`crate::ManifestMode`]), the escaped link target for `l`, `-`
//! otherwise; `path` is relative (`.` is the root itself). Bytes that
//! are not printable ASCII, and `%`, are escaped as `%XX`, so any name fits on a line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

use crate::error::StoreError;

/// First line of every manifest; a different header is a different format.
pub(crate) const HEADER: &str = "# vrun layer manifest v1";

/// Threads hashing a manifest: enough to overlap reads with hashing on a big host; more
/// would fight the other pipeline of the same setup (build and image run at once).
const MAX_HASH_THREADS: usize = 4;

/// Read buffer for hashing files (large enough that syscalls don't dominate).
const HASH_BUF: usize = 128 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ManifestEntry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub content: String,
}

/// Counts gathered by the same walk; stored in the layer's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub other: u64,
    /// Sum of regular file sizes (hard links counted once).
    pub bytes: u64,
    /// Allocated blocks of the tree in bytes (hard links counted once).
    pub disk_bytes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Manifest {
    /// Escaped relative path → entry.
    pub entries: BTreeMap<String, ManifestEntry>,
    pub stats: TreeStats,
}

impl Manifest {
    /// Walks `root` without following symlinks; hashes regular files when `hash` is set
    /// (otherwise their content column is `-`).
    pub fn scan(root: &Path, hash: bool) -> Result<Manifest, StoreError> {
        let mut m = Manifest::default();
        let mut walk = Walk::default();
        m.visit(root, b".".to_vec(), &mut walk)?;
        if !hash {
            for (rel, _) in walk.files {
                if let Some(e) = m.entries.get_mut(&rel) {
                    e.content = "-".to_owned();
                }
            }
            return Ok(m);
        }
        let digests = hash_all(&walk.to_hash)?;
        for (rel, inode) in walk.files {
            if let Some(e) = m.entries.get_mut(&rel) {
                e.content = digests[&inode].clone();
            }
        }
        Ok(m)
    }

    fn visit(&mut self, path: &Path, rel: Vec<u8>, walk: &mut Walk) -> Result<(), StoreError> {
        let meta = fs_err::symlink_metadata(path)?;
        let ft = meta.file_type();
        let inode = (meta.dev(), meta.ino());
        let first_link = walk.seen.insert(inode);
        let (kind, content, size) = if ft.is_dir() {
            self.stats.dirs += 1;
            ('d', "-".to_owned(), 0)
        } else if ft.is_file() {
            self.stats.files += 1;
            if first_link {
                self.stats.bytes += meta.len();
                walk.to_hash.push((inode, path.to_owned()));
            }
            walk.files.push((escape(&rel), inode));
            ('f', String::new(), meta.len())
        } else if ft.is_symlink() {
            self.stats.symlinks += 1;
            let target = fs_err::read_link(path)?;
            ('l', escape(target.as_os_str().as_bytes()), meta.len())
        } else {
            self.stats.other += 1;
            let kind = if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                's'
            };
            (kind, "-".to_owned(), 0)
        };
        if first_link || !ft.is_file() {
            self.stats.disk_bytes += meta.blocks() * 512;
        }
        self.entries.insert(
            escape(&rel),
            ManifestEntry {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size,
                content,
            },
        );
        if ft.is_dir() {
            let mut children: Vec<_> = fs_err::read_dir(path)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            children.sort();
            for name in children {
                let mut child_rel = if rel == b"." { Vec::new() } else { rel.clone() };
                if !child_rel.is_empty() {
                    child_rel.push(b'/');
                }
                child_rel.extend_from_slice(name.as_bytes());
                self.visit(&path.join(&name), child_rel, walk)?;
            }
        }
        Ok(())
    }

    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(self.entries.len() * 100);
        out.push_str(HEADER);
        out.push('\n');
        for (path, e) in &self.entries {
            out.push_str(&format!(
                "{}\t{:o}\t{}\t{}\t{}\t{}\t{}\n",
                e.kind, e.mode, e.uid, e.gid, e.size, e.content, path
            ));
        }
        out
    }

    /// Parses [`Manifest::to_text`] output; `None` for anything else (a corrupt manifest
    /// is reported by verify, never trusted).
    pub fn parse(text: &str) -> Option<Manifest> {
        let mut lines = text.lines();
        if lines.next()? != HEADER {
            return None;
        }
        let mut m = Manifest::default();
        for line in lines {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 7 {
                return None;
            }
            let mut kind = f[0].chars();
            let entry = ManifestEntry {
                kind: kind.next()?,
                mode: u32::from_str_radix(f[1], 8).ok()?,
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                size: f[4].parse().ok()?,
                content: f[5].to_owned(),
            };
            m.entries.insert(f[6].to_owned(), entry);
        }
        Some(m)
    }

    /// Human-readable differences between what was recorded (`self`) and what is on disk
    /// now, at most `limit` of them (plus a count of the rest).
    pub fn diff(&self, actual: &Manifest, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut total = 0usize;
        let mut push = |s: String| {
            total += 1;
            if out.len() < limit {
                out.push(s);
            }
        };
        for (path, want) in &self.entries {
            match actual.entries.get(path) {
                None => push(format!("missing {path}")),
                Some(got) if got != want => {
                    push(format!("changed {path}: {}", describe_change(want, got)))
                }
                Some(_) => {}
            }
        }
        for path in actual.entries.keys() {
            if !self.entries.contains_key(path) {
                push(format!("unexpected {path}"));
            }
        }
        if total > out.len() {
            out.push(format!("and {} more differences", total - out.len()));
        }
        out
    }
}

fn describe_change(want: &ManifestEntry, got: &ManifestEntry) -> String {
    let mut parts = Vec::new();
    if want.kind != got.kind {
        parts.push(format!("type {} → {}", want.kind, got.kind));
    }
    if want.mode != got.mode {
        parts.push(format!("mode {:o} → {:o}", want.mode, got.mode));
    }
    if (want.uid, want.gid) != (got.uid, got.gid) {
        parts.push(format!(
            "owner {}:{} → {}:{}",
            want.uid, want.gid, got.uid, got.gid
        ));
    }
    if want.size != got.size {
        parts.push(format!("size {} → {}", want.size, got.size));
    }
    if want.content != got.content {
        parts.push("content differs".to_owned());
    }
    parts.join(", ")
}

/// (device, inode): identifies hard links.
type Inode = (u64, u64);

/// State of one walk: inodes seen (hard links are hashed and counted once), the regular
/// files to fill in once hashed, and the unique files to hash.
#[derive(Default)]
struct Walk {
    seen: HashSet<Inode>,
    files: Vec<(String, Inode)>,
    to_hash: Vec<(Inode, PathBuf)>,
}

/// Hashes files on a few threads: the walk is one thread of `lstat`s, but reading and
/// hashing tens of MiB is CPU-bound and spreads well.
fn hash_all(files: &[(Inode, PathBuf)]) -> Result<HashMap<Inode, String>, StoreError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_HASH_THREADS);
    let next = AtomicUsize::new(0);
    let per_thread: Vec<Result<Vec<(Inode, String)>, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((inode, path)) = files.get(i) else {
                            return Ok(out);
                        };
                        out.push((*inode, hash_file(path)?));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("hashing thread does not panic"))
            .collect()
    });
    let mut digests = HashMap::with_capacity(files.len());
    for part in per_thread {
        digests.extend(part?);
    }
    Ok(digests)
}

/// sha256 of a file's bytes, lowercase hex.
pub(crate) fn hash_file(path: &Path) -> Result<String, StoreError> {
    let mut f = File::open(path).map_err(|e| StoreError::io("cannot open", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| StoreError::io("cannot read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// `%XX`-escapes bytes that would break the line format or are not printable ASCII.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if !(0x20..0x7f).contains(&b) || b == b'%' {
            s.push_str(&format!("%{b:02X}"));
        } else {
            s.push(b as char);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_lines_intact() {
        assert_eq!(escape(b"a b/c"), "a b/c");
        assert_eq!(escape(b"t\tn\n%\xff"), "t%09n%0A%25%FF");
    }

    #[test]
    fn text_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/x\ty"), b"hello").unwrap();
        std::os::unix::fs::symlink("../elsewhere", dir.path().join("link")).unwrap();
        std::fs::hard_link(dir.path().join("sub/x\ty"), dir.path().join("hard")).unwrap();
        let m = Manifest::scan(dir.path(), true).unwrap();
        let shallow = Manifest::scan(dir.path(), false).unwrap();
        assert_eq!(shallow.entries["hard"].content, "-");
        assert_eq!(shallow.stats, m.stats);
        let hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(m.entries["hard"].content, hello);
        assert_eq!(m.entries["sub/x%09y"].content, hello);
        assert_eq!(
            (m.stats.files, m.stats.bytes),
            (2, 5),
            "hard links counted once"
        );
        let text = m.to_text();
        let back = Manifest::parse(&text).unwrap();
        assert_eq!(back.entries, m.entries);
        assert_eq!(m.stats.symlinks, 1);
        assert_eq!(m.stats.dirs, 2);
        assert!(m.entries.contains_key("sub/x%09y"));
        assert!(Manifest::parse("garbage\n").is_none());
    }
}
