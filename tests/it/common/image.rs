//! Test tarballs built in the test: the busybox-static OS image and an app build.
//!
//! No binary blobs are committed. The image is the product's own:
//! [`vrun::sample::busybox_image`], the one `vrun demo` deploys (`/bin/busybox` from the
//! host plus applet symlinks, an `app` user and group 1000, empty `/etc/hostname`,
//! `hosts` and `resolv.conf`, the usual empty mount points, a sticky `/tmp`), so the
//! image the tests use and the image the demo ships cannot drift apart. The library
//! keeps the builder because the demo needs it at run time; the tests only add, after
//! the library's members, the one applet the demo's image has no use for (`tty`, which
//! the pty test runs). Test archives of their own ([`Entry`], [`tar_gz`]) are written
//! with the same [`vrun::sample::Archive`] (GNU headers, numeric owners, a fixed mtime,
//! gzip without a timestamp), like the tarballs Velociraptor serves. The build is an
//! app whose Procfile runs busybox's httpd on `$PORT`, serving `/app/www`.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use vrun::sample::{self, Archive};

/// A member to put in a tarball: path (relative), contents, mode, numeric owner.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
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
    pub fn owned(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
}

/// `entries` added to `archive` in order.
fn add(archive: &mut Archive, entries: &[Entry]) {
    for e in entries {
        archive.owned(e.uid, e.gid);
        match &e.kind {
            Kind::Dir => archive.dir(&e.path, e.mode),
            Kind::File(body) => archive.file(&e.path, e.mode, body),
            Kind::Symlink(target) => archive.symlink(&e.path, target),
        };
    }
}

/// A gzip'd tarball of `entries`, in order.
pub fn tar_gz(entries: &[Entry]) -> Vec<u8> {
    let mut archive = Archive::new();
    add(&mut archive, entries);
    archive.tar_gz().unwrap()
}

/// The busybox-static image (an OS root), as `.tar.gz` bytes: the demo's image plus
/// `bin/tty`. Built once per test binary (gzipping the 2 MB binary is most of the cost).
pub fn busybox_image() -> Vec<u8> {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let mut image = sample::busybox_image(Path::new(sample::BUSYBOX))
                .expect("busybox-static installed (/bin/busybox)");
            add(&mut image, &[Entry::symlink("bin/tty", "busybox")]);
            image.tar_gz().unwrap()
        })
        .clone()
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
