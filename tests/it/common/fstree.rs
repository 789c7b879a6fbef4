//! Trees as the kernel shows them, for comparing two of them: every entry's type, 12-bit
//! mode, owner, mtime with nanoseconds, size, link count, content (read by data runs, so
//! a sparse file costs only its data), symlink target, xattrs, data/hole map and
//! hard-link group. Used by the EROFS writer's tests and by the suites that extract every
//! archive with both sinks (`twin`). The walk itself is `testkit::walk`, the suites' one.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub nlink: u64,
    pub content: Option<Vec<u8>>,
    pub target: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Data runs (SEEK_DATA/SEEK_HOLE), for regular files.
    pub data_map: Vec<(u64, u64)>,
    /// First path (in walk order) of this node's hard-link group.
    pub group: Vec<u8>,
}

pub fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cp = c(p);
    let mut buf = vec![0u8; 65536];
    let n = unsafe { libc::llistxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    let mut out = Vec::new();
    for name in buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        let k =
            unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(
            k >= 0,
            "lgetxattr {} {}",
            p.display(),
            String::from_utf8_lossy(name)
        );
        v.truncate(k as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

pub fn data_map(f: &fs::File, size: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        out.push((d as u64, h as u64));
        pos = h;
    }
    out
}

pub fn walk(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut groups: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    // The root itself (path ""), then everything below it.
    let below = testkit::walk(root)
        .into_iter()
        .map(|f| (f.path, f.rel.into_os_string().into_vec(), f.meta));
    let top = (
        root.to_owned(),
        Vec::new(),
        fs::symlink_metadata(root).unwrap(),
    );
    for (p, rel, m) in std::iter::once(top).chain(below) {
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if std::os::unix::fs::FileTypeExt::is_fifo(&ft) {
            "fifo"
        } else {
            "other"
        };
        let group = groups.entry(m.ino()).or_insert_with(|| rel.clone()).clone();
        let (content, map) = if ft.is_file() {
            // Only the data runs are read: a 5 GiB sparse file costs its few blocks.
            let f = fs::File::open(&p).unwrap();
            let map = data_map(&f, m.size());
            let mut v = Vec::new();
            for &(s, e) in &map {
                let mut b = vec![0u8; (e - s) as usize];
                f.read_exact_at(&mut b, s).unwrap();
                v.extend_from_slice(&b);
            }
            (Some(v), map)
        } else {
            (None, Vec::new())
        };
        let node = Node {
            kind,
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            mtime: (m.mtime(), m.mtime_nsec()),
            size: if ft.is_dir() { 0 } else { m.size() },
            nlink: m.nlink(),
            content,
            target: ft
                .is_symlink()
                .then(|| fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
            xattrs: xattrs(&p),
            data_map: map,
            group: if ft.is_dir() { Vec::new() } else { group },
        };
        out.insert(rel, node);
    }
    // Groups are named by walk order, which differs between filesystems: rename each group
    // by its smallest path.
    let mut smallest: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for (path, n) in &out {
        if n.kind != "dir" {
            let e = smallest
                .entry(n.group.clone())
                .or_insert_with(|| path.clone());
            if path < e {
                *e = path.clone();
            }
        }
    }
    for n in out.values_mut() {
        if n.kind != "dir" {
            n.group = smallest[&n.group].clone();
        }
    }
    out
}
