//! Both sinks side by side (issue 15): every archive the extract, adversarial and property
//! suites extract goes through the directory extractor, as the test asked, and through
//! the EROFS sink into an image. The image must pass `fsck.erofs`, and mounted it must be
//! exactly the tree the directory extractor made — types, content, link targets,
//! hard-link groups, modes, owners, mtimes with nanoseconds, xattrs, data/hole maps, link
//! counts — or both must refuse the archive with the same message.
//!
//! [`extract`] and [`extract_with`] have the signatures of `vrun::extract`'s, so a suite
//! switches by its `use` line and every archive in it is checked twice; what the test
//! itself asserts is about the directory extraction, as before.
//!
//! What cannot be equal is left out, each for its reason:
//! - the root directory's mtime and owner when the archive has no `./` entry (the test's
//!   temp dir vs the image's implicit root); its mode is made 0755 on both sides first;
//! - the mtime of a directory the archive does not list (made when a child needed it):
//!   the time it was made, so it need only fall within the extraction on both sides;
//! - errors that name a system call of one sink (`cannot create …: os error`): the EROFS
//!   sink makes none of those calls; the free-space error names another path.
//!
//! Streams larger than [`TWIN_MAX`] (the bomb tests) are only extracted the directory way.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use vrun::erofs::mount::{self, MountOptions};
use vrun::extract::{ErofsSink, ExtractError, ExtractStats, ImageRoot, Limits, Mode, Writers};

use super::fstree::{walk, Node};

/// Decoded bytes held in memory for the second extraction; a longer stream (a bomb, a
/// limit test) is extracted only by the directory sink.
const TWIN_MAX: usize = 64 << 20;

/// `vrun::extract::extract`, checked against the EROFS sink (see the module note).
pub fn extract(
    tar: impl Read,
    dest: &Path,
    mode: Mode,
    limits: &Limits,
) -> Result<ExtractStats, ExtractError> {
    extract_with(tar, dest, mode, limits, Writers::default())
}

/// `vrun::extract::extract_with`, checked against the EROFS sink.
pub fn extract_with(
    tar: impl Read,
    dest: &Path,
    mode: Mode,
    limits: &Limits,
    writers: Writers,
) -> Result<ExtractStats, ExtractError> {
    let _ = fs::set_permissions(dest, fs::Permissions::from_mode(0o755));
    let started = now();
    // The directory sink reads the stream as it would alone; a copy is kept on the way.
    let mut tee = Tee {
        inner: tar,
        copy: Vec::new(),
        overflow: false,
        failed: false,
    };
    let dir = vrun::extract::extract_with(&mut tee, dest, mode, limits, writers);
    // What it left unread (it stops at a refusal), for the second extraction.
    if dir.is_err() && !tee.failed && !tee.overflow {
        let _ = std::io::copy(&mut tee, &mut std::io::sink());
    }
    if tee.failed || tee.overflow {
        return dir; // a stream that fails, or a bomb: nothing whole to extract twice
    }
    if dir.as_ref().is_err_and(sink_specific) {
        return dir; // the directory's own medium failed (ENOSPC, …): nothing to compare
    }
    let held = std::mem::take(&mut tee.copy);
    let image = Image::new();
    let erofs = image.extract(&held, mode, limits);
    let ended = now();
    // The directory sink with writer threads may name a different entry for one race (a
    // file, then an entry under it: whether the thread made the file yet); inline it
    // cannot, so a disagreement is settled against an inline extraction.
    let again = tempfile::tempdir().unwrap();
    let rerun = || {
        let _ = fs::set_permissions(again.path(), fs::Permissions::from_mode(0o755));
        vrun::extract::extract_with(&held[..], again.path(), mode, limits, Writers::Inline)
    };
    let inline;
    let (dir_result, tree) = match (&dir, &erofs) {
        (Err(a), Err(b)) if a.to_string() != b.to_string() && writers != Writers::Inline => {
            inline = rerun();
            (&inline, again.path())
        }
        _ => (&dir, dest),
    };
    match (dir_result, &erofs) {
        (Ok(a), Ok(b)) => {
            assert_eq!(
                counts(a),
                counts(b),
                "the EROFS sink counted the archive differently"
            );
            image.check(tree, (started, ended));
        }
        (Err(a), Err(b)) if sink_specific(a) || sink_specific(b) => {}
        (Err(a), Err(b)) => assert_eq!(
            a.to_string(),
            b.to_string(),
            "the two sinks refused the archive differently"
        ),
        (Ok(_), Err(e)) => panic!("only the EROFS sink refused the archive: {e}"),
        (Err(e), Ok(_)) => {
            assert!(
                sink_specific(e),
                "only the directory extractor refused the archive: {e}"
            )
        }
    }
    dir
}

/// Passes a stream through, keeping a copy of up to [`TWIN_MAX`] bytes.
struct Tee<R> {
    inner: R,
    copy: Vec<u8>,
    overflow: bool,
    failed: bool,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|_| self.failed = true)?;
        if !self.overflow {
            if self.copy.len() + n > TWIN_MAX {
                self.overflow = true;
                self.copy = Vec::new();
            } else {
                self.copy.extend_from_slice(&buf[..n]);
            }
        }
        Ok(n)
    }
}

fn now() -> (i64, i64) {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    (d.as_secs() as i64, d.subsec_nanos() as i64)
}

/// What both sinks must count the same (the reader, limits and policy are shared).
fn counts(s: &ExtractStats) -> [u64; 11] {
    [
        s.entries,
        s.files,
        s.dirs,
        s.symlinks,
        s.hardlinks,
        s.bytes,
        s.sparse_files,
        s.skipped_devices,
        s.xattrs,
        s.dropped_xattrs,
        s.dropped_acls,
    ]
}

/// Errors that come from one sink's own medium, not from the archive and the rules.
fn sink_specific(e: &ExtractError) -> bool {
    matches!(
        e,
        ExtractError::Io { .. }
            | ExtractError::Dest { .. }
            | ExtractError::NoSpace { .. }
            | ExtractError::Image { .. }
    )
}

/// A temp dir holding the image and its mount point; unmounts and removes both on Drop,
/// even when a comparison failed.
struct Image(PathBuf);

impl Image {
    fn new() -> Image {
        let p = std::env::temp_dir().join(format!(
            "vrun-twin-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(p.join("mnt")).unwrap();
        Image(p)
    }

    fn path(&self) -> PathBuf {
        self.0.join("layer.erofs")
    }

    fn extract(
        &self,
        tar: &[u8],
        mode: Mode,
        limits: &Limits,
    ) -> Result<ExtractStats, ExtractError> {
        let mut sink = ErofsSink::create(&self.path(), mode, limits, ImageRoot::Top)?;
        vrun::extract::extract_into(tar, &mut sink, mode, limits)
    }

    /// fsck, mount, compare with the directory tree at `dest`.
    fn check(&self, dest: &Path, window: ((i64, i64), (i64, i64))) {
        let out = Command::new("fsck.erofs")
            .arg(self.path())
            .output()
            .expect("fsck.erofs (erofs-utils) runs");
        assert!(
            out.status.success(),
            "fsck.erofs: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = self.0.join("mnt");
        mount::mount_image(&self.path(), &mnt, &MountOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = walk(dest);
        let img = walk(&mnt);
        compare(&dir, &img, window);
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = mount::unmount(&self.0.join("mnt"));
        let _ = vrun::mounts::remove_dir_on_one_fs(&self.0);
    }
}

fn compare(
    dir: &std::collections::BTreeMap<Vec<u8>, Node>,
    img: &std::collections::BTreeMap<Vec<u8>, Node>,
    (t0, t1): ((i64, i64), (i64, i64)),
) {
    let names = |t: &std::collections::BTreeMap<Vec<u8>, Node>| -> Vec<String> {
        t.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    };
    assert_eq!(names(dir), names(img), "the two sinks made different paths");
    let during = |m: (i64, i64)| m >= (t0.0 - 1, t0.1) && m <= (t1.0 + 1, t1.1);
    for (k, a) in dir {
        let mut b = img[k].clone();
        let mut a = a.clone();
        let shown = String::from_utf8_lossy(k);
        if k.is_empty() && during(a.mtime) {
            // No `./` entry: the test's own dir against the image's implicit root.
            (b.uid, b.gid, b.mtime) = (a.uid, a.gid, a.mtime);
        }
        if a.kind == "dir" && during(a.mtime) {
            assert!(
                during(b.mtime),
                "directory {shown:?}: made during the extraction by one sink, not the other"
            );
            b.mtime = a.mtime;
        }
        // Symlink modes are 0777 on every Linux filesystem; EROFS stores them so too.
        if a.kind == "symlink" {
            a.mode = b.mode;
        }
        assert_eq!(a, b, "entry {shown:?} differs between the two sinks");
    }
}
