//! The sample app and the minimal OS image that `vrun demo` deploys, built in memory.
//!
//! Why in memory and not files in the repository: the demo must work on a fresh machine
//! without internet, and an image has to carry the host's own `/bin/busybox` (a binary we
//! must not commit). Building both tarballs at run time from a few constants costs a few
//! milliseconds and keeps the repository free of binaries. The same builders serve the
//! integration tests: their image is [`busybox_image`] plus the one applet only a test
//! runs (`tests/it/common/image.rs`), and their archives are written with [`Archive`], so
//! "the image the tests use" and "the image the demo uses" cannot drift apart. The
//! builders live here, not in the test kit, because the demo needs them at run time.
//!
//! Why deterministic: every header has a fixed mtime, numeric owners and no user names,
//! and the gzip header has no timestamp or file name, so the same inputs give the same
//! bytes and the same md5 on every run. That lets the demo's second run hit the cache
//! (`"cache":"layer"`) and lets tests pin md5s they compute once.
//!
//! Two artifacts:
//! - the **app build** ([`app_build`]): a `Procfile` whose `web` line serves `/app/www` on
//!   `$PORT` (busybox `httpd` when the root has busybox, else `python3 -m http.server`),
//!   a page that says it was deployed by vrun, a `/health` file, and two uptests under
//!   `uptests/web/`. The scripts are POSIX sh and only use tools both roots have, so the
//!   same build runs on the busybox image and in host-rootfs mode.
//! - the **busybox image** ([`busybox_image`]): an OS root with no distribution in it.
//!   `/bin/busybox` from the host plus applet symlinks (and `/usr/bin/env`, and a
//!   `/bin/bash` that runs `sh`), a passwd and group with root, an `app` user and group
//!   1000 and nobody/nogroup, empty `/etc/hostname`, `hosts` and `resolv.conf` (LXC
//!   bind-mounts the host's over them; a missing target would be created mode 0000), the
//!   usual empty mount points, `/root` 0700 and a sticky `/tmp`. When busybox-static is
//!   not installed there is no image: [`ImageMode::HostRootfs`] runs the proc on the
//!   host's system directories read-only.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flate2::write::GzEncoder;
use flate2::Compression;
use md5::{Digest, Md5};
use tar::{EntryType, Header};

/// Where busybox-static puts its binary on Debian; the image copies it from here.
pub const BUSYBOX: &str = "/bin/busybox";

/// The image's `app` user and group: the first regular id on Debian.
pub const APP_UID: u32 = 1000;
pub const APP_GID: u32 = 1000;

/// Every entry's mtime (2024-01-01T00:00:00Z): fixed so the tarballs are reproducible.
pub const MTIME: u64 = 1_704_067_200;

/// The proc name of the sample app's only Procfile line; its uptests live under it.
pub const PROC_NAME: &str = "web";

/// Text the front page contains; the first uptest and the demo's own GET look for it.
pub const PAGE_MARKER: &str = "deployed by vrun";

/// Body of `/health`; the second uptest checks it.
pub const HEALTH_BODY: &str = "ok\n";

/// Busybox applets the image links into `/bin`: what the sample app, the uptests, `vrun
/// shell` users and the LXC tests reach for, plus everyday tools.
pub const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "ls",
    "cat",
    "id",
    "sleep",
    "wget",
    "nc",
    "httpd",
    "echo",
    "env",
    "pwd",
    "ps",
    "kill",
    "mount",
    "grep",
    "head",
    "tail",
    "true",
    "false",
    "printf",
    "date",
    "stat",
    "sed",
    "awk",
    "mkdir",
    "rm",
    "touch",
    "readlink",
    "hostname",
    "cut",
    "tr",
    "wc",
    "whoami",
    "groups",
    "nproc",
    "timeout",
    "setsid",
    "cp",
    "mv",
    "ln",
    "chmod",
    "find",
    "xargs",
    "du",
    "df",
    "uname",
    "which",
    "test",
    "[",
    "expr",
    "sort",
    "uniq",
    "tee",
    "vi",
    "less",
    "top",
    "netstat",
    "md5sum",
    "sha256sum",
    "dd",
    "free",
    "seq",
    "yes",
    "basename",
    "dirname",
];

/// Why a sample tarball could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("cannot read {path} for the sample image (is busybox-static installed?)")]
    ReadBusybox { path: PathBuf, source: io::Error },
    #[error("sample tarball entry {path}")]
    Entry { path: String, source: io::Error },
    #[error("cannot compress the sample tarball")]
    Compress { source: io::Error },
}

/// Which root filesystem the demo's proc gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageMode {
    /// The busybox image built from the host's `/bin/busybox`.
    Busybox,
    /// No image: the host's `/bin /usr /lib …` read-only plus the build layer.
    HostRootfs,
}

impl ImageMode {
    /// Busybox when `/bin/busybox` is a regular file, else host-rootfs.
    pub fn detect() -> ImageMode {
        Self::detect_at(Path::new(BUSYBOX))
    }

    pub fn detect_at(busybox: &Path) -> ImageMode {
        match std::fs::metadata(busybox) {
            Ok(m) if m.is_file() => ImageMode::Busybox,
            _ => ImageMode::HostRootfs,
        }
    }
}

/// One tar member, kept until [`Archive::tar`] writes them all in insertion order.
#[derive(Debug, Clone)]
enum Member {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    uid: u32,
    gid: u32,
    member: Member,
}

/// A small, deterministic tarball under construction: directories, files and symlinks
/// with explicit modes and numeric owners (root unless [`Archive::owned`] says otherwise).
/// Members are written in the order they were added, so add a directory before its files.
#[derive(Debug, Clone, Default)]
pub struct Archive {
    entries: Vec<Entry>,
    owner: (u32, u32),
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Owner (uid, gid) of the members added from now on.
    pub fn owned(&mut self, uid: u32, gid: u32) -> &mut Archive {
        self.owner = (uid, gid);
        self
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Archive {
        self.push(path, Member::Dir { mode })
    }

    pub fn file(&mut self, path: &str, mode: u32, data: impl AsRef<[u8]>) -> &mut Archive {
        let data = data.as_ref().to_vec();
        self.push(path, Member::File { mode, data })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Archive {
        let target = target.to_string();
        self.push(path, Member::Symlink { target })
    }

    /// Member paths in archive order (directories without a trailing slash).
    pub fn paths(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.path.as_str()).collect()
    }

    fn push(&mut self, path: &str, member: Member) -> &mut Archive {
        let (uid, gid) = self.owner;
        self.entries.push(Entry {
            path: path.to_string(),
            uid,
            gid,
            member,
        });
        self
    }

    /// The uncompressed tarball (GNU headers, so long names work).
    pub fn tar(&self) -> Result<Vec<u8>, SampleError> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in &self.entries {
            append(&mut builder, entry).map_err(|source| SampleError::Entry {
                path: entry.path.clone(),
                source,
            })?;
        }
        builder.into_inner().map_err(|source| SampleError::Entry {
            path: "(end of archive)".into(),
            source,
        })
    }

    /// The tarball, gzipped with a header that has no timestamp or name.
    pub fn tar_gz(&self) -> Result<Vec<u8>, SampleError> {
        gzip(&self.tar()?)
    }
}

fn append(builder: &mut tar::Builder<Vec<u8>>, entry: &Entry) -> io::Result<()> {
    let mut header = Header::new_gnu();
    header.set_mtime(MTIME);
    header.set_uid(entry.uid.into());
    header.set_gid(entry.gid.into());
    match &entry.member {
        Member::Dir { mode } => {
            header.set_entry_type(EntryType::Directory);
            header.set_mode(*mode);
            header.set_size(0);
            builder.append_data(&mut header, format!("{}/", entry.path), io::empty())
        }
        Member::File { mode, data } => {
            header.set_entry_type(EntryType::Regular);
            header.set_mode(*mode);
            header.set_size(data.len() as u64);
            builder.append_data(&mut header, &entry.path, data.as_slice())
        }
        Member::Symlink { target } => {
            header.set_entry_type(EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            builder.append_link(&mut header, &entry.path, target)
        }
    }
}

/// Gzip `data` deterministically (no mtime, no file name in the header).
pub fn gzip(data: &[u8]) -> Result<Vec<u8>, SampleError> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder
        .write_all(data)
        .and_then(|()| encoder.finish())
        .map_err(|source| SampleError::Compress { source })
}

/// Lowercase hex md5 of `data`: what proc.yaml's `build_md5`/`image_md5` hold.
pub fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

/// The app's start script. POSIX sh; serves `/app/www` with whatever HTTP server the root
/// has, bound to `$BIND_ADDR` (proc.yaml's env; default all addresses) and `$PORT`.
pub const SERVE_SCRIPT: &str = r#"#!/bin/sh
# Serve /app/www on $PORT with the HTTP server this root has: busybox httpd on the
# busybox image, python3's http.server when the proc runs on the host's root.
set -e
addr="${BIND_ADDR:-0.0.0.0}"
echo "demo app: serving /app/www on $addr:$PORT as uid $(id -u) in $(pwd)" >&2
echo "demo app: GREETING=${GREETING-unset} (from env.sh), DEMO_PROFILE=${DEMO_PROFILE-unset} (from .profile.d)" >&2
echo "demo app: $APP_SETTINGS_YAML says: $(sed '/^#/d' "${APP_SETTINGS_YAML:-/dev/null}" | tr '\n' ' ')" >&2
if command -v busybox >/dev/null 2>&1; then
    exec busybox httpd -f -v -p "$addr:$PORT" -h /app/www
fi
if command -v python3 >/dev/null 2>&1; then
    exec python3 -m http.server --bind "$addr" --directory /app/www "$PORT"
fi
echo "demo app: neither busybox nor python3 is in this root; cannot serve" >&2
exit 127
"#;

/// Shared first half of both uptests: `get URL` prints the body with the first HTTP
/// client the root has (busybox/GNU wget, curl, or python3), failing on a non-2xx answer.
/// No `wget -T`: Debian 12's busybox-static wget segfaults with it (measured, rc 139);
/// `vrun uptest --timeout` bounds a hung uptest anyway.
const UPTEST_GET: &str = r#"#!/bin/sh
# Uptest: called as SCRIPT HOST PORT; exit 0 means the proc is up.
get() {
    if command -v wget >/dev/null 2>&1; then wget -q -O- "$1"
    elif command -v curl >/dev/null 2>&1; then curl -fsS -m 5 "$1"
    else python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"
    fi
}
"#;

/// `uptests/web/01_http_ok`: the front page answers and says who deployed it.
pub fn uptest_http_ok() -> String {
    format!(
        r#"{UPTEST_GET}url="http://$1:$2/"
page=$(get "$url") || {{ echo "GET $url failed"; exit 1; }}
case "$page" in
    *"{PAGE_MARKER}"*) echo "GET $url: the page says it was {PAGE_MARKER}" ;;
    *) echo "GET $url: page does not say '{PAGE_MARKER}': $page"; exit 1 ;;
esac
"#
    )
}

/// `uptests/web/02_health`: `/health` answers `ok`.
pub fn uptest_health() -> String {
    format!(
        r#"{UPTEST_GET}url="http://$1:$2/health"
body=$(get "$url") || {{ echo "GET $url failed"; exit 1; }}
if [ "$body" = "ok" ]; then echo "GET $url: ok"; else echo "GET $url: expected ok, got: $body"; exit 1; fi
"#
    )
}

/// The front page.
pub fn index_html() -> String {
    format!(
        "<h1>Hello from the vrun demo: this page was {PAGE_MARKER}</h1>\n\
         <p>Velociraptor's runner fetched this build, verified its md5, unpacked it into its\n\
         cache, mounted it under an overlay and started this server in an LXC container.</p>\n"
    )
}

/// The sample app build, ready to pack (add members first to extend it in a test).
pub fn app_build() -> Archive {
    let mut a = Archive::new();
    a.file(
        "Procfile",
        0o644,
        format!("{PROC_NAME}: exec /app/bin/serve\n"),
    )
    .dir("bin", 0o755)
    .file("bin/serve", 0o755, SERVE_SCRIPT)
    .dir("www", 0o755)
    .file("www/index.html", 0o644, index_html())
    .file("www/health", 0o644, HEALTH_BODY)
    .dir(".profile.d", 0o755)
    .file(
        ".profile.d/demo.sh",
        0o644,
        "# Sourced by /proc.sh before env.sh, like a buildpack's profile scripts.\n\
         export DEMO_PROFILE=sourced\n",
    )
    .dir("uptests", 0o755)
    .dir(&format!("uptests/{PROC_NAME}"), 0o755)
    .file(
        &format!("uptests/{PROC_NAME}/01_http_ok"),
        0o755,
        uptest_http_ok(),
    )
    .file(
        &format!("uptests/{PROC_NAME}/02_health"),
        0o755,
        uptest_health(),
    );
    a
}

/// The sample app build as `.tar.gz` bytes.
pub fn app_build_tar_gz() -> Result<Vec<u8>, SampleError> {
    app_build().tar_gz()
}

/// The minimal busybox image with `busybox` read from the given path.
pub fn busybox_image(busybox: &Path) -> Result<Archive, SampleError> {
    let binary = std::fs::read(busybox).map_err(|source| SampleError::ReadBusybox {
        path: busybox.to_path_buf(),
        source,
    })?;
    let mut a = Archive::new();
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "var",
        "app", "home", "root",
    ] {
        a.dir(dir, if dir == "root" { 0o700 } else { 0o755 });
    }
    a.dir("tmp", 0o1777);
    a.file("bin/busybox", 0o755, binary);
    for applet in APPLETS {
        a.symlink(&format!("bin/{applet}"), "busybox");
    }
    a.symlink("usr/bin/env", "../../bin/busybox");
    // busybox-static has no bash applet; legacy `bash -c …` commands get sh.
    a.file("bin/bash", 0o755, "#!/bin/sh\nexec /bin/sh \"$@\"\n");
    for placeholder in ["etc/hostname", "etc/hosts", "etc/resolv.conf"] {
        a.file(placeholder, 0o644, "");
    }
    a.file(
        "etc/passwd",
        0o644,
        format!(
            "root:x:0:0:root:/root:/bin/sh\n\
             app:x:{APP_UID}:{APP_GID}:app:/home/app:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        ),
    );
    a.file(
        "etc/group",
        0o644,
        format!("root:x:0:\napp:x:{APP_GID}:\nnogroup:x:65534:\n"),
    );
    a.owned(APP_UID, APP_GID).dir("home/app", 0o755);
    Ok(a)
}

/// The minimal image built from the host's `/bin/busybox`, as `.tar.gz` bytes. Built once
/// per process (gzipping a 2 MB binary is most of the cost; tests call this a lot).
pub fn busybox_image_tar_gz() -> Result<Vec<u8>, SampleError> {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    if let Some(image) = IMAGE.get() {
        return Ok(image.clone());
    }
    let image = busybox_image(Path::new(BUSYBOX))?.tar_gz()?;
    Ok(IMAGE.get_or_init(|| image).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tarballs_are_reproducible() {
        assert_eq!(
            md5_hex(&app_build_tar_gz().unwrap()),
            md5_hex(&app_build_tar_gz().unwrap())
        );
    }

    #[test]
    fn archive_reads_back() {
        let bytes = app_build().tar().unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.mtime().unwrap(), MTIME);
            assert_eq!(header.uid().unwrap(), 0);
            seen.push(entry.path().unwrap().into_owned());
        }
        let want: Vec<PathBuf> = app_build().paths().into_iter().map(PathBuf::from).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn missing_busybox_is_host_rootfs_mode_and_a_named_error() {
        let missing = Path::new("/nonexistent/busybox");
        assert_eq!(ImageMode::detect_at(missing), ImageMode::HostRootfs);
        let err = busybox_image(missing).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/busybox"), "{err}");
        assert!(err.contains("busybox-static"), "{err}");
    }
}
