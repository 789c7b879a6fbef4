//! Decoding and safe extraction, against real archives built here with GNU tar, the real
//! compressors, and the `tar` crate's Builder for hostile shapes GNU tar will not write.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vrun::decode::{self, Format};
// Every archive here is extracted by both sinks (`twin`): the directory tree the tests
// inspect, and an EROFS image that must mount as the same tree.
use crate::common::twin::{extract, extract_with};
use vrun::extract::{ExtractError, ExtractStats, Limits, Mode, Writers};

const BUILD: Mode = Mode::Build {
    uid: 4321,
    gid: 4322,
};

// ---------------------------------------------------------------- helpers

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vrun-extract-")
        .tempdir()
        .unwrap()
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A source tree exercising names, types, modes, owners and sizes.
fn make_source(dir: &Path) {
    let w = |p: &str, data: &[u8], mode: u32| {
        let p = dir.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    w("app/README", b"hello\n", 0o644);
    w("app/bin/run", b"#!/bin/sh\necho hi\n", 0o755);
    w("app/bin/suid", b"suid", 0o4755);
    w("app/bin/sgid-sticky", b"x", 0o3775);
    w("app/world-writable", b"ww", 0o666);
    w("app/private", b"secret", 0o600);
    w("app/readonly", b"ro", 0o444);
    w("app/no-perms", b"none", 0o000);
    w("app/empty", b"", 0o644);
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    w("app/data/big.bin", &big, 0o644);
    let deep = format!("app/{}/{}", "d".repeat(120), "long-file-name-".repeat(10));
    w(&deep, b"long name", 0o644);
    fs::create_dir_all(dir.join("app/empty-dir")).unwrap();
    fs::create_dir_all(dir.join("app/ro-dir/sub")).unwrap();
    fs::write(dir.join("app/ro-dir/sub/f"), b"in ro").unwrap();
    fs::set_permissions(dir.join("app/ro-dir"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::create_dir_all(dir.join("app/open-dir")).unwrap();
    fs::set_permissions(dir.join("app/open-dir"), fs::Permissions::from_mode(0o1777)).unwrap();
    symlink("bin/run", dir.join("app/run-link")).unwrap();
    symlink("../README", dir.join("app/bin/readme-link")).unwrap();
    symlink("missing-target", dir.join("app/dangling")).unwrap();
    fs::hard_link(dir.join("app/README"), dir.join("app/README.hard")).unwrap();
    for (i, p) in ["app/README", "app/bin/run", "app/data/big.bin"]
        .iter()
        .enumerate()
    {
        std::os::unix::fs::chown(dir.join(p), Some(1000 + i as u32), Some(2000)).unwrap();
    }
}

/// Plain tar of `src/app` made by GNU tar.
fn gnu_tar(src: &Path, out: &Path) {
    run(Command::new("tar")
        .args(["--numeric-owner", "--format=gnu", "-cf"])
        .arg(out)
        .arg("-C")
        .arg(src)
        .arg("app"));
}

#[derive(Debug, PartialEq, Clone)]
struct Node {
    kind: char,
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: Option<i64>,
    nlink: u64,
    sha256: String,
    link: Option<PathBuf>,
}

/// Everything below `root` (not following symlinks), keyed by relative path.
fn walk(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    for found in testkit::walk(root) {
        let (p, m) = (&found.path, &found.meta);
        let kind = testkit::kind_char(m.file_type());
        let sha256 = if kind == 'f' {
            hex::encode(Sha256::digest(fs::read(p).unwrap()))
        } else {
            String::new()
        };
        out.insert(
            found.rel.to_string_lossy().into_owned(),
            Node {
                kind,
                perm: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if kind == 'f' { m.len() } else { 0 },
                mtime: (kind == 'f').then(|| m.mtime()),
                nlink: if kind == 'd' { 0 } else { m.nlink() },
                sha256,
                link: (kind == 'l').then(|| fs::read_link(p).unwrap()),
            },
        );
    }
    out
}

fn extract_file(archive: &Path, dest: &Path, mode: Mode) -> Result<ExtractStats, ExtractError> {
    let f = fs::File::open(archive).unwrap();
    let (_, r) = decode::open(f).unwrap();
    extract(r, dest, mode, &Limits::default())
}

/// A dir outside every extraction root whose contents and mtimes must never change.
struct Sentinel {
    _dir: tempfile::TempDir,
    path: PathBuf,
    before: BTreeMap<String, Node>,
    dir_mtime: i64,
}

impl Sentinel {
    fn new() -> Sentinel {
        let dir = tmp();
        let path = dir.path().join("host");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("target"), b"do not touch").unwrap();
        fs::write(path.join("passwd"), b"root:x:0:0").unwrap();
        let before = walk(&path);
        let dir_mtime = fs::metadata(&path).unwrap().mtime();
        Sentinel {
            _dir: dir,
            path,
            before,
            dir_mtime,
        }
    }

    fn check(&self) {
        assert_eq!(
            walk(&self.path),
            self.before,
            "sentinel {} changed",
            self.path.display()
        );
        assert_eq!(fs::metadata(&self.path).unwrap().mtime(), self.dir_mtime);
    }

    fn abs(&self) -> String {
        self.path.to_str().unwrap().to_string()
    }
}

/// One raw tar entry, with names written byte for byte (no validation by the builder).
struct Raw<'a> {
    kind: u8,
    name: &'a [u8],
    link: &'a [u8],
    mode: u32,
    uid: u64,
    gid: u64,
    data: &'a [u8],
}

impl<'a> Raw<'a> {
    fn file(name: &'a str, data: &'a [u8]) -> Raw<'a> {
        Raw {
            kind: b'0',
            name: name.as_bytes(),
            link: b"",
            mode: 0o644,
            uid: 0,
            gid: 0,
            data,
        }
    }
    fn dir(name: &'a str, mode: u32) -> Raw<'a> {
        Raw {
            kind: b'5',
            mode,
            ..Raw::file(name, b"")
        }
    }
    fn symlink(name: &'a str, target: &'a str) -> Raw<'a> {
        Raw {
            kind: b'2',
            link: target.as_bytes(),
            mode: 0o777,
            ..Raw::file(name, b"")
        }
    }
    fn hardlink(name: &'a str, target: &'a str) -> Raw<'a> {
        Raw {
            kind: b'1',
            link: target.as_bytes(),
            ..Raw::file(name, b"")
        }
    }
    fn kind(self, kind: u8) -> Raw<'a> {
        Raw { kind, ..self }
    }
    fn mode(self, mode: u32) -> Raw<'a> {
        Raw { mode, ..self }
    }
    fn owner(self, uid: u64, gid: u64) -> Raw<'a> {
        Raw { uid, gid, ..self }
    }
}

fn raw_header(e: &Raw<'_>, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    {
        let u = h.as_ustar_mut().unwrap();
        u.name[..e.name.len()].copy_from_slice(e.name);
        u.linkname[..e.link.len()].copy_from_slice(e.link);
    }
    h.set_entry_type(tar::EntryType::new(e.kind));
    h.set_mode(e.mode);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    h.set_mtime(1_600_000_000);
    h.set_size(size);
    h.set_cksum();
    h
}

fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        b.append(&raw_header(e, e.data.len() as u64), e.data)
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
    let mut len = body.len() + 1;
    while format!("{len}").len() + body.len() != len {
        len += 1;
    }
    [format!("{len}").as_bytes(), &body].concat()
}

fn compress(format: Format, data: &[u8]) -> Vec<u8> {
    let tool: &[&str] = match format {
        Format::Gzip => &["gzip", "-c", "-1"],
        Format::Bzip2 => &["bzip2", "-c", "-1"],
        Format::Xz => &["xz", "-c", "-1", "-T2", "--block-size=262144"],
        Format::Zstd => &["zstd", "-c", "-q", "-1"],
        Format::Tar => return data.to_vec(),
    };
    testkit::pipe_through(tool, data)
}

fn decode_all(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (_, mut r) = decode::open(data).map_err(std::io::Error::other)?;
    let mut out = Vec::new();
    r.read_to_end(&mut out)?;
    Ok(out)
}

const COMPRESSED: [Format; 4] = [Format::Gzip, Format::Bzip2, Format::Xz, Format::Zstd];

// ---------------------------------------------------------------- decoding

#[test]
fn every_format_decodes_including_concatenated_members() {
    let src = tmp();
    make_source(src.path());
    let tar_path = src.path().join("a.tar");
    gnu_tar(src.path(), &tar_path);
    let plain = fs::read(&tar_path).unwrap();
    assert_eq!(decode::detect(&plain), Some(Format::Tar));
    assert_eq!(decode_all(&plain).unwrap(), plain);
    for format in COMPRESSED {
        let packed = compress(format, &plain);
        assert_eq!(decode::detect(&packed), Some(format));
        assert!(decode_all(&packed).unwrap() == plain, "{format}");
        // Two members (pigz/pbzip2/zstd -T style), split mid-block.
        let (a, b) = plain.split_at(plain.len() / 3 + 17);
        let multi = [compress(format, a), compress(format, b)].concat();
        assert!(
            decode_all(&multi).unwrap() == plain,
            "{format} multi-member"
        );
    }
}

#[test]
fn truncated_and_trailing_garbage_are_errors() {
    let plain = raw_tar(&[Raw::file("f", &[7u8; 100_000])]);
    for format in COMPRESSED {
        let packed = compress(format, &plain);
        for cut in [packed.len() - 1, packed.len() - 9, packed.len() / 2] {
            let err = decode_all(&packed[..cut]).unwrap_err().to_string();
            assert!(err.contains(format.name()), "{format} cut at {cut}: {err}");
            // And through extract, naming the format.
            let dest = tmp();
            let (_, r) = decode::open(&packed[..cut]).unwrap();
            let e = extract(r, dest.path(), BUILD, &Limits::default()).unwrap_err();
            let e = vrun::errors::chain(&e);
            assert!(e.contains(format.name()), "{format}: {e}");
        }
        let garbage = [packed.clone(), b"GARBAGE!".to_vec()].concat();
        let err = decode_all(&garbage).unwrap_err().to_string();
        assert!(err.contains("trailing garbage"), "{format}: {err}");
        assert!(err.contains("47 41 52"), "{format}: {err}");
        // Zero padding after the last member is accepted.
        let padded = [packed.clone(), vec![0; 1024]].concat();
        assert!(decode_all(&padded).unwrap() == plain, "{format} padded");
    }
    let head = b"<!DOCTYPE html><html>";
    let err = decode::open(&head[..]).err().unwrap().to_string();
    assert!(
        err.contains("3c 21 44") && err.contains("<!DOCTYPE"),
        "{err}"
    );
}

// ---------------------------------------------------------------- build mode vs GNU tar

/// What the build rules say GNU tar's (root, permission-preserving) tree becomes.
fn as_build(mut gnu: BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    for n in gnu.values_mut() {
        if n.kind != 'l' {
            let kept = n.perm & 0o755;
            n.perm = if n.kind == 'd' {
                kept | 0o700
            } else {
                kept | 0o600
            };
        }
        n.uid = 4321;
        n.gid = 4322;
    }
    gnu
}

#[test]
fn build_tree_equals_gnu_tar_extraction_with_build_rules() {
    let src = tmp();
    make_source(src.path());
    let tar_path = src.path().join("a.tar");
    gnu_tar(src.path(), &tar_path);

    let gnu = tmp();
    run(Command::new("tar")
        .args(["--numeric-owner", "-xpf"])
        .arg(&tar_path)
        .arg("-C")
        .arg(gnu.path()));
    let expected = as_build(walk(gnu.path()));

    for writers in [Writers::Inline, Writers::Threads(1), Writers::Threads(3)] {
        let ours = tmp();
        let f = fs::File::open(&tar_path).unwrap();
        let stats = extract_with(f, ours.path(), BUILD, &Limits::default(), writers).unwrap();
        let got = walk(ours.path());
        for (k, v) in &expected {
            assert_eq!(got.get(k), Some(v), "{writers:?}: {k}");
        }
        assert_eq!(got.len(), expected.len(), "{writers:?}");
        assert_eq!(stats.symlinks, 3);
        assert_eq!(stats.hardlinks, 1);
        assert!(stats.first_file_done.is_some());
        assert_eq!(got["app/bin/suid"].perm, 0o755, "setuid cleared");
        assert_eq!(got["app/ro-dir"].perm, 0o755);
    }
}

#[test]
fn image_keeps_owners_and_modes_and_compressed_formats_match() {
    let src = tmp();
    make_source(src.path());
    let tar_path = src.path().join("a.tar");
    gnu_tar(src.path(), &tar_path);
    let gnu = tmp();
    run(Command::new("tar")
        .args(["--numeric-owner", "-xpf"])
        .arg(&tar_path)
        .arg("-C")
        .arg(gnu.path()));
    let expected = walk(gnu.path());
    let plain = fs::read(&tar_path).unwrap();
    for format in [Format::Tar, Format::Gzip, Format::Zstd] {
        let packed = src.path().join(format!("a.{format}"));
        fs::write(&packed, compress(format, &plain)).unwrap();
        let ours = tmp();
        extract_file(&packed, ours.path(), Mode::Image).unwrap();
        assert_eq!(walk(ours.path()), expected, "{format}");
    }
}

// ---------------------------------------------------------------- image mode specifics

#[test]
fn image_resolves_absolute_symlinks_inside_the_root() {
    let s = Sentinel::new();
    let host = s.abs();
    let inside = format!("var/run/{}", "x");
    let tar = raw_tar(&[
        Raw::dir("var", 0o755),
        Raw::symlink("var/run", &host),
        Raw::file(&inside, b"written under var/run")
            .owner(1000, 1001)
            .mode(0o4750),
        Raw::file("var/run/target", b"replaced?"),
        Raw::file("chr", b"").kind(b'3'),
        Raw::file("blk", b"").kind(b'4'),
        Raw::file("fifo", b"").kind(b'6'),
    ]);
    let dest = tmp();
    let stats = extract(&tar[..], dest.path(), Mode::Image, &Limits::default()).unwrap();
    s.check();
    assert_eq!(stats.skipped_devices, 3);
    let landed = dest.path().join(host.trim_start_matches('/'));
    let m = fs::metadata(landed.join("x")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o4750));
    assert_eq!(fs::read(landed.join("target")).unwrap(), b"replaced?");
    assert_eq!(
        fs::read_link(dest.path().join("var/run")).unwrap(),
        Path::new(&host)
    );
}

// ---------------------------------------------------------------- hostile shapes, both modes

/// Extract `tar` in both modes; returns (build result, image result, image dest).
fn both(
    tar: &[u8],
) -> (
    Result<ExtractStats, ExtractError>,
    Result<ExtractStats, ExtractError>,
    tempfile::TempDir,
) {
    let b = tmp();
    let build = extract(tar, b.path(), BUILD, &Limits::default());
    let i = tmp();
    let image = extract(tar, i.path(), Mode::Image, &Limits::default());
    (build, image, i)
}

fn rejected(r: Result<ExtractStats, ExtractError>, entry: &str, why: &str) {
    let e = r.expect_err("should be rejected").to_string();
    assert!(
        e.contains(entry) && e.contains(why),
        "expected `{entry}` / `{why}` in: {e}"
    );
}

#[test]
fn dotdot_paths() {
    let tar = raw_tar(&[Raw::file("../../evil", b"x"), Raw::file("a/../../b", b"y")]);
    let (build, image, dest) = both(&tar);
    rejected(build, "../../evil", "`..`");
    image.unwrap();
    assert_eq!(fs::read(dest.path().join("evil")).unwrap(), b"x");
    assert_eq!(fs::read(dest.path().join("b")).unwrap(), b"y");
}

#[test]
fn absolute_paths_are_stripped() {
    let s = Sentinel::new();
    let name = format!("{}/target", s.abs());
    let tar = raw_tar(&[Raw::file(&name, b"inside")]);
    let (build, image, dest) = both(&tar);
    build.unwrap();
    image.unwrap();
    s.check();
    assert_eq!(
        fs::read(dest.path().join(name.trim_start_matches('/'))).unwrap(),
        b"inside"
    );
}

#[test]
fn symlink_then_write_through_it() {
    let s = Sentinel::new();
    let depth = "../".repeat(20);
    let rel = format!("{depth}{}", s.abs().trim_start_matches('/'));
    for target in [s.abs(), rel] {
        let tar = raw_tar(&[
            Raw::symlink("link", &target),
            Raw::file("link/target", b"pwned"),
        ]);
        let (build, image, dest) = both(&tar);
        rejected(build, "link", "symlink target");
        image.unwrap();
        s.check();
        let landed = dest
            .path()
            .join(s.abs().trim_start_matches('/'))
            .join("target");
        assert_eq!(fs::read(landed).unwrap(), b"pwned");
    }
    // A build refuses to traverse even an in-tree symlinked directory.
    let tar = raw_tar(&[
        Raw::dir("d", 0o755),
        Raw::symlink("l", "d"),
        Raw::file("l/f", b"x"),
    ]);
    rejected(
        extract(&tar[..], tmp().path(), BUILD, &Limits::default()),
        "l/f",
        "symlink `l`",
    );
}

#[test]
fn file_replacing_a_symlink_to_outside_replaces_the_link() {
    let s = Sentinel::new();
    let target = format!("{}/target", s.abs());
    let tar = raw_tar(&[Raw::symlink("s", &target), Raw::file("s", b"new")]);
    let i = tmp();
    extract(&tar[..], i.path(), Mode::Image, &Limits::default()).unwrap();
    s.check();
    let m = fs::symlink_metadata(i.path().join("s")).unwrap();
    assert!(m.is_file());
    assert_eq!(fs::read(i.path().join("s")).unwrap(), b"new");
}

#[test]
fn hard_links_to_outside() {
    let s = Sentinel::new();
    let abs = format!("{}/passwd", s.abs());
    for target in ["../../../../etc/passwd", abs.as_str()] {
        let tar = raw_tar(&[Raw::hardlink("hl", target)]);
        let (build, image, _dest) = both(&tar);
        assert!(build.unwrap_err().to_string().contains("hl"));
        rejected(image, "hl", "does not exist");
        s.check();
        assert_eq!(fs::metadata(&abs).unwrap().nlink(), 1);
    }
    // Within the root, and to a directory.
    let tar = raw_tar(&[
        Raw::file("a", b"1"),
        Raw::hardlink("b", "a"),
        Raw::dir("d", 0o755),
        Raw::hardlink("e", "d"),
    ]);
    let (build, image, _dest) = both(&tar);
    rejected(build, "e", "is a directory");
    rejected(image, "e", "is a directory");
}

#[test]
fn devices_and_setuid() {
    let tar = raw_tar(&[
        Raw::file("suid", b"x").mode(0o6777),
        Raw::file("dev", b"").kind(b'3'),
    ]);
    let (build, image, dest) = both(&tar);
    rejected(build, "dev", "device");
    assert_eq!(image.unwrap().skipped_devices, 1);
    assert!(!dest.path().join("dev").exists());
    assert_eq!(
        fs::metadata(dest.path().join("suid")).unwrap().mode() & 0o7777,
        0o6777
    );
    let tar = raw_tar(&[Raw::file("suid", b"x").mode(0o6777).owner(0, 0)]);
    let b = tmp();
    extract(&tar[..], b.path(), BUILD, &Limits::default()).unwrap();
    let m = fs::metadata(b.path().join("suid")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o755, 4321, 4322));
}

#[test]
fn duplicates_later_entry_wins() {
    let tar = raw_tar(&[
        Raw::file("x", b"first"),
        Raw::file("x", b"second"),
        Raw::dir("d", 0o700),
        Raw::file("d/in", b"in"),
        Raw::file("d", b"file over dir"),
        Raw::file("y", b"file"),
        Raw::dir("y", 0o750),
        Raw::dir("y", 0o755),
        Raw::file("imp/x/f", b"deep"),
        Raw::file("imp/x", b"file over implicit dir"),
        Raw::file("imp2/y/f", b""),
        Raw::symlink("imp2/y", "target"),
    ]);
    for writers in [Writers::Inline, Writers::Threads(2)] {
        for mode in [BUILD, Mode::Image] {
            let dest = tmp();
            extract_with(&tar[..], dest.path(), mode, &Limits::default(), writers).unwrap();
            assert_eq!(fs::read(dest.path().join("x")).unwrap(), b"second");
            assert_eq!(fs::read(dest.path().join("d")).unwrap(), b"file over dir");
            let y = fs::metadata(dest.path().join("y")).unwrap();
            assert!(y.is_dir());
            assert_eq!(y.mode() & 0o777, 0o755);
            assert_eq!(
                fs::read(dest.path().join("imp/x")).unwrap(),
                b"file over implicit dir"
            );
            let link = fs::read_link(dest.path().join("imp2/y")).unwrap();
            assert_eq!(link, Path::new("target"));
        }
    }
}

#[test]
fn long_names_pax_and_component_limit() {
    let long = format!("{}/{}", "p".repeat(200), "q".repeat(200));
    let mut b = tar::Builder::new(Vec::new());
    let pax = [
        pax_record("path", long.as_bytes()),
        pax_record("linkpath", b"../target"),
    ]
    .concat();
    let mut h = raw_header(&Raw::file("PaxHeaders/x", b"").kind(b'x'), pax.len() as u64);
    h.set_cksum();
    b.append(&h, &pax[..]).unwrap();
    b.append(&raw_header(&Raw::symlink("short", "t"), 0), &b""[..])
        .unwrap();
    let tar = b.into_inner().unwrap();
    let dest = tmp();
    extract(&tar[..], dest.path(), BUILD, &Limits::default()).unwrap();
    assert_eq!(
        fs::read_link(dest.path().join(&long)).unwrap(),
        Path::new("../target")
    );

    let over = format!("ok/{}", "z".repeat(256));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, &over, &b"x"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let (build, image, _d) = both(&tar);
    rejected(build, "zzzz", "256 bytes");
    rejected(image, "zzzz", "256 bytes");
}

#[test]
fn tarmageddon_pax_size_overrides_ustar_size() {
    // The PAX header says the file is 1024 bytes; the ustar header says 0. A parser that
    // trusts the ustar size would read the file's data as a header ("smuggled").
    let smuggled = raw_tar(&[Raw::file("smuggled", b"evil")]);
    let data = smuggled[..1024].to_vec();
    let pax = pax_record("size", b"1024");
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &raw_header(&Raw::file("PaxHeaders/f", b"").kind(b'x'), pax.len() as u64),
        &pax[..],
    )
    .unwrap();
    b.append(&raw_header(&Raw::file("f", b""), 0), &b""[..])
        .unwrap();
    let mut tar = b.into_inner().unwrap();
    // Splice: header of f is followed by 1024 bytes of data (that look like a tar entry).
    let end = tar.len() - 1024; // builder's two zero blocks
    tar.truncate(end);
    tar.extend_from_slice(&data);
    tar.extend_from_slice(&[0; 1024]);
    let dest = tmp();
    let stats = extract(&tar[..], dest.path(), Mode::Image, &Limits::default()).unwrap();
    assert_eq!(stats.files, 1);
    assert_eq!(fs::metadata(dest.path().join("f")).unwrap().len(), 1024);
    assert!(!dest.path().join("smuggled").exists());
    // GNU tar lists the same single entry.
    let t = tmp();
    fs::write(t.path().join("a.tar"), &tar).unwrap();
    let list = run(Command::new("tar").arg("tf").arg(t.path().join("a.tar")));
    assert_eq!(String::from_utf8(list).unwrap(), "f\n");
}

// ---------------------------------------------------------------- stream shape and limits

#[test]
fn junk_after_end_truncation_and_missing_end_marker() {
    let tar = raw_tar(&[Raw::file("f", b"data")]);
    let junk = [tar.clone(), b"junk".to_vec()].concat();
    let e = extract(&junk[..], tmp().path(), BUILD, &Limits::default()).unwrap_err();
    assert!(
        matches!(e, ExtractError::JunkAfterEnd { offset } if offset == tar.len() as u64),
        "{e}"
    );
    let padded = [tar.clone(), vec![0; 8192]].concat();
    extract(&padded[..], tmp().path(), BUILD, &Limits::default()).unwrap();
    // GNU tar extracts an archive without end blocks silently; the extractor does too and
    // says so in its stats (setup decides whether anything else proves the stream whole).
    let no_end = &tar[..1024];
    let stats = extract(no_end, tmp().path(), BUILD, &Limits::default()).unwrap();
    assert_eq!(stats.ended_without_marker.as_deref(), Some("f"));
    assert_eq!(stats.files, 1);
    let e = extract(&[][..], tmp().path(), BUILD, &Limits::default()).unwrap_err();
    assert!(matches!(e, ExtractError::NoEndMarker { .. }), "{e}");
    let mid = &tar[..600];
    let e = extract(mid, tmp().path(), BUILD, &Limits::default()).unwrap_err();
    assert!(
        e.to_string().contains("truncated") && e.to_string().contains('f'),
        "{e}"
    );
    // A blank numeric field reads as 0 (as Python's tarfile does); garbage is an error.
    let mut blank = tar.clone();
    blank[108..116].fill(0); // uid
    let mut h = tar::Header::from_byte_slice(&blank[..512]).clone();
    h.set_cksum();
    blank[..512].copy_from_slice(h.as_bytes());
    extract(&blank[..], tmp().path(), Mode::Image, &Limits::default()).unwrap();
    blank[108] = b'x';
    let mut h = tar::Header::from_byte_slice(&blank[..512]).clone();
    h.set_cksum();
    blank[..512].copy_from_slice(h.as_bytes());
    let e = extract(&blank[..], tmp().path(), Mode::Image, &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("bad uid field"), "{e}");
    let mut bad = tar.clone();
    bad[0] = b'g';
    let e = extract(&bad[..], tmp().path(), BUILD, &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
}

#[test]
fn limits_stop_bombs() {
    // 64 MiB of zeros, gzipped to ~64 KiB, against a 10 MiB limit.
    let zeros = vec![0u8; 64 << 20];
    let tar = raw_tar(&[Raw::file("bomb", &zeros)]);
    let gz = compress(Format::Gzip, &tar);
    let limits = Limits {
        max_bytes: 10 << 20,
        ..Limits::default()
    };
    let dest = tmp();
    let e = extract(
        decode::decoder(Format::Gzip, &gz[..]),
        dest.path(),
        BUILD,
        &limits,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("total size limit") && e.to_string().contains("bomb"),
        "{e}"
    );
    // Zeros after the end marker count too.
    let tail = [raw_tar(&[Raw::file("f", b"x")]), zeros].concat();
    let gz = compress(Format::Gzip, &tail);
    let e = extract(
        decode::decoder(Format::Gzip, &gz[..]),
        tmp().path(),
        BUILD,
        &limits,
    )
    .unwrap_err();
    assert!(e.to_string().contains("total size limit"), "{e}");
    // Entry count and metadata size.
    let many: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let entries: Vec<Raw> = many.iter().map(|n| Raw::file(n, b"")).collect();
    let limits = Limits {
        max_entries: 20,
        ..Limits::default()
    };
    let e = extract(&raw_tar(&entries)[..], tmp().path(), BUILD, &limits).unwrap_err();
    assert!(
        e.to_string().contains("entry count") && e.to_string().contains("f20"),
        "{e}"
    );
    let huge = pax_record("comment", &vec![b'a'; 3 << 20]);
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &raw_header(
            &Raw::file("PaxHeaders/f", b"").kind(b'x'),
            huge.len() as u64,
        ),
        &huge[..],
    )
    .unwrap();
    b.append(&raw_header(&Raw::file("f", b""), 0), &b""[..])
        .unwrap();
    let e = extract(
        &b.into_inner().unwrap()[..],
        tmp().path(),
        BUILD,
        &Limits::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("metadata size limit"), "{e}");
}

/// A reader fed by a channel: yields whatever chunk arrives, blocks until the next one.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn first_file_is_on_disk_before_the_stream_ends() {
    let big = vec![5u8; 4 << 20];
    let tar = raw_tar(&[Raw::file("first", b"early bird"), Raw::file("second", &big)]);
    // gzip with a sync flush after the first entry, as a streaming compressor would emit.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&tar[..1024]).unwrap();
    enc.flush().unwrap();
    let head_len = enc.get_ref().len();
    enc.write_all(&tar[1024..]).unwrap();
    let gz = enc.finish().unwrap();

    for writers in [Writers::Inline, Writers::Threads(1)] {
        let (tx, rx) = std::sync::mpsc::channel();
        let dest = tmp();
        let d = dest.path().to_path_buf();
        let worker = std::thread::spawn(move || {
            let r = ChannelReader {
                rx,
                buf: Vec::new(),
                pos: 0,
            };
            // The directory sink alone: the twin would hold the stream back to read it twice.
            vrun::extract::extract_with(
                decode::decoder(Format::Gzip, r),
                &d,
                BUILD,
                &Limits::default(),
                writers,
            )
        });
        tx.send(gz[..head_len].to_vec()).unwrap();
        // The producer holds back the tail until the first file is complete on disk.
        let first = dest.path().join("first");
        let deadline = Instant::now() + Duration::from_secs(30);
        while fs::read(&first).ok().as_deref() != Some(b"early bird") {
            assert!(
                Instant::now() < deadline,
                "{writers:?}: first file never appeared"
            );
            assert!(!worker.is_finished(), "{writers:?}: extraction ended early");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!dest.path().join("second").exists());
        tx.send(gz[head_len..].to_vec()).unwrap();
        drop(tx);
        let stats = worker.join().unwrap().unwrap();
        assert_eq!((stats.files, stats.bytes), (2, 10 + (4 << 20)));
    }
}

/// Peak memory of decode + extract of a real archive, for the closing note:
/// `VRUN_RSS_ARCHIVE=target/bench-corpus/build.tar.xz cargo test --test it extract::peak_rss -- --ignored --nocapture`
#[test]
#[ignore = "measurement; needs VRUN_RSS_ARCHIVE"]
fn peak_rss_of_streaming_extract() {
    let archive = PathBuf::from(std::env::var_os("VRUN_RSS_ARCHIVE").expect("VRUN_RSS_ARCHIVE"));
    let hwm = || {
        let s = fs::read_to_string("/proc/self/status").unwrap();
        let line = s
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap()
            .to_string();
        line
    };
    let before = hwm();
    let dest = tmp();
    let stats = extract_file(&archive, dest.path(), BUILD).unwrap();
    println!(
        "{}: {} files, {} bytes; before {before}, after {}",
        archive.display(),
        stats.files,
        stats.bytes,
        hwm()
    );
}
