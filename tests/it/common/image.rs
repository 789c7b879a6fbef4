//! Test tarballs built in the test: a busybox-static OS image and an app build.
//!
//! No binary blobs are committed: the image is `/bin/busybox` (busybox-static) plus applet
//! symlinks, a passwd/group with an `app` user (1000) and an `extra` group (2000), and the
//! usual empty mount points — the same shape as `shared/lxc-recipe/build_image.sh`. The
//! build is an app whose Procfile runs busybox's httpd on `$PORT`, serving `/app/www`.
//! Both are written with the `tar` crate (ustar, numeric owners) and gzip, like the
//! tarballs Velociraptor serves.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// The applets the image links to busybox (everything the tests' scripts use).
pub const APPLETS: &[&str] = &[
    "sh", "ash", "ls", "cat", "id", "sleep", "wget", "nc", "httpd", "echo", "env", "pwd", "ps",
    "kill", "mount", "grep", "head", "tail", "true", "false", "printf", "date", "stat", "sed",
    "awk", "mkdir", "rm", "touch", "readlink", "hostname", "cut", "tr", "wc", "whoami", "groups",
    "nproc", "timeout", "setsid", "dd", "ln", "chmod", "test", "[", "tty", "sort", "uname",
];

/// A file to put in a tarball: path (relative), contents, mode.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
}

impl Entry {
    pub fn dir(path: &str, mode: u32) -> Self {
        Self {
            path: path.into(),
            kind: Kind::Dir,
            mode,
            uid: 0,
            gid: 0,
        }
    }
    pub fn file(path: &str, body: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.into(),
            kind: Kind::File(body.into()),
            mode,
            uid: 0,
            gid: 0,
        }
    }
    pub fn symlink(path: &str, target: &str) -> Self {
        Self {
            path: path.into(),
            kind: Kind::Symlink(target.into()),
            mode: 0o777,
            uid: 0,
            gid: 0,
        }
    }
    pub fn owned(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
}

/// A gzip'd tarball of `entries`, in order.
pub fn tar_gz(entries: &[Entry]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(1_700_000_000);
        match &e.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{}/", e.path), std::io::empty())
                    .unwrap();
            }
            Kind::File(body) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(body.len() as u64);
                b.append_data(&mut h, &e.path, body.as_slice()).unwrap();
            }
            Kind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &e.path, target).unwrap();
            }
        }
    }
    let gz = b.into_inner().unwrap();
    gz.finish().unwrap()
}

/// The busybox-static image (an OS root), as `.tar.gz` bytes.
pub fn busybox_image() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static installed (/bin/busybox)");
    let mut e = vec![Entry::dir(".", 0o755)];
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "var",
        "var/www", "app", "home", "root",
    ] {
        e.push(Entry::dir(d, 0o755));
    }
    e.push(Entry::dir("tmp", 0o1777));
    e.push(Entry::dir("home/app", 0o755).owned(1000, 1000));
    e.push(Entry::file("bin/busybox", busybox, 0o755));
    for a in APPLETS {
        e.push(Entry::symlink(&format!("bin/{a}"), "busybox"));
    }
    // busybox-static has no bash applet; legacy `bash -c` commands still work.
    e.push(Entry::file(
        "bin/bash",
        "#!/bin/sh\nexec /bin/sh \"$@\"\n",
        0o755,
    ));
    for f in ["etc/hostname", "etc/hosts", "etc/resolv.conf"] {
        e.push(Entry::file(f, "", 0o644));
    }
    e.push(Entry::file(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    ));
    e.push(Entry::file(
        "etc/group",
        "root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n",
        0o644,
    ));
    e.push(Entry::file(
        "var/www/index.html",
        "<h1>hello from image</h1>\n",
        0o644,
    ));
    tar_gz(&e)
}

/// The page the test app serves.
pub const APP_PAGE: &str = "<h1>hello from the vrun test app</h1>\n";

/// The app build: Procfile + `www/index.html` + `extra` entries (uptests, scripts), as
/// `.tar.gz` bytes. Paths are relative to the app root (they land under `/app`).
pub fn app_build(extra: &[Entry]) -> Vec<u8> {
    let mut e = vec![
        Entry::dir(".", 0o755),
        Entry::file(
            "Procfile",
            "web: busybox httpd -f -p $PORT -h /app/www\n",
            0o644,
        ),
        Entry::dir("www", 0o755),
        Entry::file("www/index.html", APP_PAGE, 0o644),
    ];
    e.extend(extra.iter().cloned());
    tar_gz(&e)
}

/// Extract with GNU tar as root, numeric owners (what the image layer looks like until
/// the extract pipeline is wired into these tests).
pub fn gnu_untar(tar_gz: &[u8], dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    let mut child = Command::new("tar")
        .args(["--numeric-owner", "-xzf", "-", "-C"])
        .arg(dest)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("GNU tar");
    child.stdin.take().unwrap().write_all(tar_gz).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "tar -x into {}",
        dest.display()
    );
}
