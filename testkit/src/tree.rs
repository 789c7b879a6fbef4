//! A directory tree as a comparable value: what two set-ups, two roots or a set-up
//! before and after a crash must agree on.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Every path below `root` (relative, `/`-separated) → its kind and content (`dir`,
/// `link TARGET`, `file SHA256`), mode (with the file type bits), `uid:gid` and, for
/// everything but directories, the size. Directory sizes are left out: they depend on
/// how many entries the directory ever held, not on what it holds. Symlinks are not
/// followed.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for e in entries {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let (mode, owner) = (m.mode(), format!("{}:{}", m.uid(), m.gid()));
            let line = if m.is_dir() {
                todo.push(p.clone());
                format!("dir {mode:o} {owner}")
            } else if m.file_type().is_symlink() {
                let target = fs::read_link(&p).unwrap();
                format!("link {} {mode:o} {owner} {}", target.display(), m.size())
            } else {
                let data = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                let sha = hex::encode(Sha256::digest(&data));
                format!("file {sha} {mode:o} {owner} {}", m.size())
            };
            out.insert(rel, line);
        }
    }
    out
}
