//! What an entry may be, per mode: the pure half of the rules (no system calls).
//!
//! [`plan`] turns one entry of the tar reader into what a sink must make of it: the
//! normalized path, the kind (or a refusal, or a skip), the final permission bits, owner
//! and mtime, and the xattrs to apply. Names are normalized here, once, and every later
//! stage only sees the normalized form. Builds follow PEP 706's `data` filter; images
//! follow containerd (see the module note of `extract`). Keeping this pure and apart from
//! the directory writer is what lets another sink (an EROFS image, issue 15) take the
//! same entries under the same rules. The in-root walk in `tree` is the second line of
//! defence: even a path that passed here is resolved without ever leaving the root.
//!
//! Extended attributes: images keep every `SCHILY.xattr.*` (`security.capability`,
//! `trusted.*`, `user.*`, as containerd applies them) except POSIX ACLs, which are
//! dropped and counted like `SCHILY.acl.*` records; builds drop all of them, counted.
//! Hard links carry none (GNU tar does not apply them to a link: they belong to the
//! inode, archived with its first name). An image xattr in `trusted.overlay.*` is refused:
//! image layers are overlayfs lower dirs, where those names are the kernel's own
//! metadata (opaque dirs, redirects, metacopy), not the file's.

use crate::tar::{Entry, Kind, Mtime, Segment};

use super::{ExtractError, Limits, Mode};

/// Longest file name Linux filesystems accept (`NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// A normalized entry path: relative, `/`-separated, without empty, `.` or `..` parts.
/// Empty means the root itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn components(&self) -> impl DoubleEndedIterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// Parent directory and final name; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((RelPath(self.0[..i].to_vec()), &self.0[i + 1..])),
            None => Some((RelPath(Vec::new()), &self.0[..])),
        }
    }
}

/// How `..` is treated when normalizing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DotDot {
    /// Refused (builds: simplest rule that is obviously safe).
    Reject,
    /// Removes the previous component, and is dropped at the root (images, as containerd's
    /// `filepath.Join("/", name)` does).
    Clamp,
}

/// Normalize an archive name: leading `/` stripped (both modes), `.` and empty parts
/// dropped, `..` per `dotdot`, and the size limits checked.
pub fn normalize(
    raw: &[u8],
    dotdot: DotDot,
    limits: &Limits,
    entry: &str,
) -> Result<RelPath, ExtractError> {
    if raw.len() > limits.max_path_len {
        return Err(ExtractError::Limit {
            entry: entry.to_string(),
            what: "path length",
            limit: limits.max_path_len as u64,
        });
    }
    if raw.contains(&0) {
        return Err(reject(entry, "name contains a NUL byte"));
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => match dotdot {
                DotDot::Reject => {
                    return Err(reject(entry, "`..` in a path is not allowed in a build"))
                }
                DotDot::Clamp => {
                    parts.pop();
                }
            },
            name => {
                if name.len() > NAME_MAX {
                    return Err(reject(
                        entry,
                        &format!(
                            "path component of {} bytes exceeds {NAME_MAX}: {}",
                            name.len(),
                            String::from_utf8_lossy(&name[..40])
                        ),
                    ));
                }
                parts.push(name);
            }
        }
    }
    if parts.len() > limits.max_depth {
        return Err(ExtractError::Limit {
            entry: entry.to_string(),
            what: "path depth",
            limit: limits.max_depth as u64,
        });
    }
    Ok(RelPath(parts.join(&b'/')))
}

/// Check a symlink target against the mode's rules.
///
/// Images keep any non-empty target: the in-root walk resolves it inside the root whenever
/// we traverse it, and inside the container the kernel does the same.
///
/// Builds refuse absolute targets and targets that leave the tree. "Leaves the tree" is
/// decided so that the answer cannot change with the order of entries: `..` may only
/// appear *before* the first normal component, where it climbs through the link's own
/// parent directories — which are real directories, because builds never traverse
/// symlinks while extracting. A `..` after a normal component would climb out of something
/// that may be (or later become) a symlink (`s -> .`, then `t -> s/..` escapes), so it is
/// refused. Every accepted link thus resolves inside the tree, by induction over links.
pub fn check_symlink(
    target: &[u8],
    link_parent_depth: usize,
    mode: Mode,
    limits: &Limits,
    entry: &str,
) -> Result<(), ExtractError> {
    if target.is_empty() {
        return Err(reject(entry, "symlink with an empty target"));
    }
    if target.len() > limits.max_path_len {
        return Err(ExtractError::Limit {
            entry: entry.to_string(),
            what: "link target length",
            limit: limits.max_path_len as u64,
        });
    }
    if target.contains(&0) {
        return Err(reject(entry, "link target contains a NUL byte"));
    }
    if matches!(mode, Mode::Image) {
        return Ok(());
    }
    let shown = String::from_utf8_lossy(target);
    if target.starts_with(b"/") {
        return Err(reject(
            entry,
            &format!("absolute symlink target `{shown}` is not allowed in a build"),
        ));
    }
    let mut climbs = 0usize;
    let mut seen_name = false;
    for comp in target.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." if seen_name => {
                return Err(reject(
                    entry,
                    &format!(
                        "symlink target `{shown}` has `..` after a name (it could leave the tree)"
                    ),
                ))
            }
            b".." => climbs += 1,
            _ => seen_name = true,
        }
    }
    if climbs > link_parent_depth {
        return Err(reject(
            entry,
            &format!("symlink target `{shown}` leaves the tree"),
        ));
    }
    Ok(())
}

/// Permission bits to give a new file, directory or the root, per mode.
///
/// Builds (PEP 706 `data`): setuid, setgid, sticky and group/other write cleared, exec bits
/// kept; files get at least `u+rw`, directories at least `u+rwx`.
/// Images: the archive's 12 bits, unchanged.
pub fn permissions(archive_mode: u32, is_dir: bool, mode: Mode) -> u32 {
    match mode {
        Mode::Image => archive_mode & 0o7777,
        Mode::Build { .. } => {
            let kept = archive_mode & 0o755;
            if is_dir {
                kept | 0o700
            } else {
                kept | 0o600
            }
        }
    }
}

/// What a sink makes of one entry.
#[derive(Debug)]
pub struct Planned {
    /// The entry's name as archived, for messages.
    pub entry: String,
    pub path: RelPath,
    pub what: What,
    /// Permission bits (all 12 in images).
    pub perm: u32,
    /// Owner to give it: the proc's user in builds, the archive's numbers in images.
    pub owner: (u32, u32),
    pub mtime: Mtime,
    /// Extended attributes to set (name, value).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub dropped_xattrs: u64,
    pub dropped_acls: u64,
}

#[derive(Debug)]
pub enum What {
    /// A regular file of `size` bytes; `data_len` bytes of data follow in the archive,
    /// written at the `sparse` segments' offsets when there are any (holes elsewhere).
    File {
        size: u64,
        data_len: u64,
        sparse: Option<Vec<Segment>>,
    },
    Dir,
    Symlink {
        target: Vec<u8>,
    },
    HardLink {
        target: RelPath,
        shown: String,
    },
    /// A device node or fifo in an image: skipped, counted.
    SkippedDevice,
}

/// Xattr names that are POSIX ACLs in their binary form.
const ACL_XATTRS: [&[u8]; 2] = [b"system.posix_acl_access", b"system.posix_acl_default"];

/// Decide what `e` becomes under `mode`, or refuse it.
pub fn plan(e: &Entry, mode: Mode, limits: &Limits) -> Result<Planned, ExtractError> {
    let entry = e.name();
    let dotdot = match mode {
        Mode::Build { .. } => DotDot::Reject,
        Mode::Image => DotDot::Clamp,
    };
    let path = normalize(&e.path, dotdot, limits, &entry)?;
    if path.is_root() && e.kind != Kind::Dir {
        return Err(reject(&entry, "entry has an empty name"));
    }
    let what = match e.kind {
        Kind::File => What::File {
            size: e.size,
            data_len: e.data_len,
            sparse: e.sparse.clone(),
        },
        Kind::Dir => What::Dir,
        Kind::Symlink => {
            let depth = path.depth().saturating_sub(1);
            check_symlink(&e.link, depth, mode, limits, &entry)?;
            What::Symlink {
                target: e.link.clone(),
            }
        }
        Kind::HardLink => {
            let shown = String::from_utf8_lossy(&e.link).into_owned();
            if e.link.starts_with(b"/") && matches!(mode, Mode::Build { .. }) {
                return Err(reject(
                    &entry,
                    &format!("absolute hard link target `{shown}` is not allowed in a build"),
                ));
            }
            let target = normalize(&e.link, dotdot, limits, &entry)?;
            if target.is_root() {
                return Err(reject(&entry, "hard link with an empty target"));
            }
            What::HardLink { target, shown }
        }
        Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => match mode {
            Mode::Build { .. } => {
                return Err(reject(
                    &entry,
                    "device nodes and fifos are not allowed in a build",
                ))
            }
            Mode::Image => What::SkippedDevice,
        },
    };
    let owner = match mode {
        Mode::Build { uid, gid } => (uid, gid),
        Mode::Image => (e.uid, e.gid),
    };
    let mut xattrs = Vec::new();
    let (mut dropped_xattrs, mut dropped_acls) = (0, u64::from(e.acls));
    if !matches!(what, What::HardLink { .. } | What::SkippedDevice) {
        for (name, value) in &e.xattrs {
            if ACL_XATTRS.contains(&name.as_slice()) {
                dropped_acls += 1;
            } else if matches!(mode, Mode::Build { .. }) {
                dropped_xattrs += 1;
            } else if name.starts_with(b"trusted.overlay.") {
                return Err(reject(
                    &entry,
                    &format!(
                        "xattr `{}` is overlayfs metadata, which an image layer (an overlay \
                         lower dir) must not carry",
                        String::from_utf8_lossy(name)
                    ),
                ));
            } else {
                xattrs.push((name.clone(), value.clone()));
            }
        }
    }
    Ok(Planned {
        perm: permissions(e.mode, matches!(what, What::Dir), mode),
        entry,
        path,
        what,
        owner,
        mtime: e.mtime,
        xattrs,
        dropped_xattrs,
        dropped_acls,
    })
}

pub fn reject(entry: &str, reason: &str) -> ExtractError {
    ExtractError::Rejected {
        entry: entry.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(raw: &str, dd: DotDot) -> Result<String, String> {
        normalize(raw.as_bytes(), dd, &Limits::default(), raw)
            .map(|p| String::from_utf8(p.0).unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn normalize_strips_and_clamps() {
        assert_eq!(norm("/a//./b/", DotDot::Reject).unwrap(), "a/b");
        assert_eq!(norm("./", DotDot::Reject).unwrap(), "");
        assert_eq!(norm("../../x/../y", DotDot::Clamp).unwrap(), "y");
        assert!(norm("a/../b", DotDot::Reject).unwrap_err().contains("`..`"));
        let long = format!("a/{}", "x".repeat(256));
        assert!(norm(&long, DotDot::Clamp)
            .unwrap_err()
            .contains("256 bytes"));
    }

    #[test]
    fn build_symlink_rules() {
        let b = Mode::Build { uid: 1, gid: 1 };
        let l = Limits::default();
        let ok = |t: &str, d| check_symlink(t.as_bytes(), d, b, &l, "e").is_ok();
        assert!(ok("x", 0));
        assert!(ok("../x/bin", 1));
        assert!(ok("./../../y", 2));
        assert!(!ok("../x", 0));
        assert!(!ok("/etc", 3));
        assert!(!ok("s/..", 3));
        assert!(!ok("", 3));
        assert!(check_symlink(b"/etc", 0, Mode::Image, &l, "e").is_ok());
    }

    #[test]
    fn xattrs_per_mode() {
        let e = Entry {
            path: b"f".to_vec(),
            link: Vec::new(),
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            uname: Vec::new(),
            gname: Vec::new(),
            mtime: Mtime::default(),
            device: (0, 0),
            size: 0,
            data_len: 0,
            sparse: None,
            xattrs: vec![
                (b"security.capability".to_vec(), vec![1]),
                (b"system.posix_acl_access".to_vec(), vec![2]),
                (b"user.k".to_vec(), b"v".to_vec()),
            ],
            acls: 1,
            format: crate::tar::Format::Posix,
            offset: 0,
        };
        let l = Limits::default();
        let image = plan(&e, Mode::Image, &l).unwrap();
        assert_eq!(image.xattrs.len(), 2);
        assert_eq!((image.dropped_xattrs, image.dropped_acls), (0, 2));
        let build = plan(&e, Mode::Build { uid: 1, gid: 1 }, &l).unwrap();
        assert!(build.xattrs.is_empty());
        assert_eq!((build.dropped_xattrs, build.dropped_acls), (2, 2));
        let mut overlay = e.clone();
        overlay.xattrs = vec![(b"trusted.overlay.redirect".to_vec(), b"/x".to_vec())];
        assert!(plan(&overlay, Mode::Image, &l)
            .unwrap_err()
            .to_string()
            .contains("overlayfs"));
        assert!(plan(&overlay, Mode::Build { uid: 1, gid: 1 }, &l).is_ok());
    }

    #[test]
    fn build_permissions() {
        let b = Mode::Build { uid: 1, gid: 1 };
        assert_eq!(permissions(0o4777, false, b), 0o755);
        assert_eq!(permissions(0o000, false, b), 0o600);
        assert_eq!(permissions(0o1777, true, b), 0o755);
        assert_eq!(permissions(0o500, true, b), 0o700);
        assert_eq!(permissions(0o4755, false, Mode::Image), 0o4755);
    }
}
