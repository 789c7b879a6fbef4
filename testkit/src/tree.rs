//! Directory trees for tests: one walk every suite shares ([`walk`]), and a tree as a
//! comparable value ([`tree`]): what two set-ups, two roots or a set-up before and after
//! a crash must agree on. Suites that compare more (EROFS: xattrs, holes, hard-link
//! groups; GNU tar fidelity: extents) build their own records from the same walk, so
//! "which entries, symlinks not followed" is decided in one place.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One entry below a walked root, as `lstat` sees it.
#[derive(Debug)]
pub struct Found {
    /// The entry itself: the root joined with [`Found::rel`].
    pub path: PathBuf,
    /// The path relative to the root (never empty).
    pub rel: PathBuf,
    /// `symlink_metadata`: a symlink is described, not followed.
    pub meta: fs::Metadata,
}

/// One letter for an entry's type, as the suites' tree records write it: `d`irectory,
/// `l`ink (symlink), `f`ile, `?` anything else.
pub fn kind_char(ft: fs::FileType) -> char {
    if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else {
        '?'
    }
}

/// Every entry below `root` (not `root` itself): each directory's entries together and in
/// name order, subdirectories depth first, never following a symlink. Panics naming the
/// path that could not be read: a test's tree that cannot be walked is a failed test.
pub fn walk(root: &Path) -> Vec<Found> {
    walk_except(root, &[])
}

/// [`walk`] without the paths in `skip` and without anything below them: the watched
/// surroundings of an extraction root, say, with the root itself left out.
pub fn walk_except(root: &Path, skip: &[PathBuf]) -> Vec<Found> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut names: Vec<_> = entries
            .map(|e| {
                e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                    .file_name()
            })
            .collect();
        names.sort();
        let first_child = todo.len();
        for name in names {
            let path = dir.join(name);
            if skip.contains(&path) {
                continue;
            }
            let meta =
                fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if meta.is_dir() {
                todo.push(path.clone());
            }
            out.push(Found { path, rel, meta });
        }
        // Visit this directory's subdirectories in name order.
        todo[first_child..].reverse();
    }
    out
}

/// Every path below `root` (relative, `/`-separated) → its kind and content (`dir`,
/// `link TARGET`, `file SHA256`), mode (with the file type bits), `uid:gid` and, for
/// everything but directories, the size. Directory sizes are left out: they depend on
/// how many entries the directory ever held, not on what it holds. Symlinks are not
/// followed.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for found in walk(root) {
        let (p, m) = (&found.path, &found.meta);
        let rel = found.rel.display().to_string();
        let (mode, owner) = (m.mode(), format!("{}:{}", m.uid(), m.gid()));
        let line = if m.is_dir() {
            format!("dir {mode:o} {owner}")
        } else if m.file_type().is_symlink() {
            let target = fs::read_link(p).unwrap();
            format!("link {} {mode:o} {owner} {}", target.display(), m.size())
        } else {
            let data = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let sha = hex::encode(Sha256::digest(&data));
            format!("file {sha} {mode:o} {owner} {}", m.size())
        };
        out.insert(rel, line);
    }
    out
}
