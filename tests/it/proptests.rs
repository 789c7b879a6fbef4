//! Property tests over mutated inputs: tar streams, compressed streams, proc.yaml documents.
//!
//! cargo-fuzz needs nightly, which this machine lacks; proptest gives the same kind of
//! search (seeded, shrinking) on stable. The properties are the promises, not details:
//!
//! - **Archives** (plain and gzip/bzip2/xz/zstd, mutated by bit flips, overwritten header
//!   fields, truncation, splices and insertions): `decode` + `extract` never panic, never
//!   write outside the root (a sentinel dir beside it is compared byte for byte after every
//!   case), and when they succeed in build mode the tree obeys the build rules (no
//!   device, fifo or setuid file, no symlink leaving the tree, every entry owned by the
//!   proc user).
//! - **proc.yaml** (valid documents mutated by character edits biased to YAML syntax and
//!   to the characters that break config files: newline, `\r`, NUL): parsing never
//!   panics; a container name that is accepted has no `/`, `..`, NUL or line break; and
//!   a `proc.lxc` that renders has only `lxc.*` lines — nothing can be injected.
//!
//! CI runs `PROPTEST_CASES` cases per property (default 1000 here: seconds in a debug
//! build). Each property also counts its accepted inputs and fails if none was accepted,
//! so a mutation scheme that only ever produces garbage cannot pass silently. Locally:
//! `PROPTEST_CASES=40000 cargo test --test it proptests:: -- --nocapture`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vrun::decode::{self, Format};
// Every generated archive is extracted by both sinks (`twin`): the directory tree the
// properties are checked on, and an EROFS image that must mount as the same tree.
use crate::common::twin::extract;
use vrun::extract::{Limits, Mode};

const UID: u32 = 4321;
const GID: u32 = 4322;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

// ------------------------------------------------------------------ seeds

fn header(name: &str, kind: u8, size: u64, mode: u32, link: &str) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    {
        let u = h.as_ustar_mut().unwrap();
        u.name[..name.len()].copy_from_slice(name.as_bytes());
        u.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_600_000_000);
    h.set_size(size);
    h.set_cksum();
    *h.as_bytes()
}

fn push(out: &mut Vec<u8>, name: &str, kind: u8, mode: u32, link: &str, data: &[u8]) {
    out.extend_from_slice(&header(name, kind, data.len() as u64, mode, link));
    out.extend_from_slice(data);
    while out.len() % 512 != 0 {
        out.push(0);
    }
}

fn pax(out: &mut Vec<u8>, key: &str, value: &str) {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}").len() + body.len() != len {
        len += 1;
    }
    push(
        out,
        "PaxHeaders/x",
        b'x',
        0o644,
        "",
        format!("{len}{body}").as_bytes(),
    );
}

/// Valid archives of every shape the extractor handles, the material mutations start from.
fn seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut a = Vec::new();
        push(&mut a, "app/", b'5', 0o755, "", b"");
        push(&mut a, "app/bin/", b'5', 0o755, "", b"");
        push(
            &mut a,
            "app/bin/run",
            b'0',
            0o755,
            "",
            b"#!/bin/sh\necho hi\n",
        );
        push(&mut a, "app/README", b'0', 0o644, "", &[b'r'; 700]);
        push(&mut a, "app/link", b'2', 0o777, "bin/run", b"");
        push(&mut a, "app/hard", b'1', 0o644, "app/README", b"");
        push(&mut a, "app/up", b'2', 0o777, "../app", b"");
        a.extend_from_slice(&[0; 1024]);

        let mut b = Vec::new();
        pax(&mut b, "path", &format!("long/{}", "n".repeat(150)));
        push(&mut b, "short", b'0', 0o644, "", b"pax named");
        pax(&mut b, "linkpath", &"t/".repeat(70));
        push(&mut b, "l", b'2', 0o777, "x", b"");
        push(&mut b, "etc/", b'5', 0o755, "", b"");
        push(
            &mut b,
            "etc/passwd",
            b'0',
            0o644,
            "",
            b"root:x:0:0::/:/bin/sh\n",
        );
        push(&mut b, "dev/null", b'3', 0o666, "", b"");
        push(&mut b, "suid", b'0', 0o4755, "", b"s");
        b.extend_from_slice(&[0; 1024]);

        let mut c = Vec::new();
        push(&mut c, "d/", b'5', 0o755, "", b"");
        push(&mut c, "s", b'2', 0o777, "d", b"");
        push(&mut c, "s/f", b'0', 0o644, "", b"via link");
        push(&mut c, "abs", b'2', 0o777, "/etc", b"");
        push(&mut c, "abs/x", b'0', 0o644, "", b"x");
        push(&mut c, "d", b'0', 0o644, "", b"over");
        c.extend_from_slice(&[0; 1024]);
        vec![a, b, c]
    })
}

fn compress(format: Format, data: &[u8]) -> Vec<u8> {
    match format {
        Format::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Format::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Format::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Format::Zstd => zstd::encode_all(data, 1).unwrap(),
        Format::Tar => data.to_vec(),
    }
}

fn compressed_seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut out = Vec::new();
        for s in seeds() {
            for f in [Format::Gzip, Format::Bzip2, Format::Xz, Format::Zstd] {
                out.push(compress(f, s));
            }
        }
        out
    })
}

// ------------------------------------------------------------------ mutations

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte.
    Flip { at: usize, mask: u8 },
    /// Overwrite bytes at a header-relative field offset of some block.
    Field {
        block: usize,
        offset: usize,
        bytes: Vec<u8>,
    },
    /// Cut the stream.
    Truncate { at: usize },
    /// Insert bytes.
    Insert { at: usize, bytes: Vec<u8> },
    /// Copy one 512-byte block over another.
    Splice { from: usize, to: usize },
}

/// Header field offsets worth hitting: name, mode, uid, size, checksum, typeflag,
/// linkname, magic, prefix.
const FIELDS: [usize; 9] = [0, 100, 108, 124, 148, 156, 157, 257, 345];

/// Values that make a field interesting.
fn field_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"../../../../sentinel/x\0".to_vec()),
        Just(b"/etc/passwd\0".to_vec()),
        Just(b"..\0".to_vec()),
        Just(b"\0".to_vec()),
        Just(b"77777777777\0".to_vec()),
        Just(b"00000001000\0".to_vec()),
        Just(vec![0x80, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        Just(b"1".to_vec()),
        Just(b"2".to_vec()),
        Just(b"3".to_vec()),
        Just(b"5".to_vec()),
        Just(b"6".to_vec()),
        Just(b"x".to_vec()),
        Just(b"g".to_vec()),
        Just(b"L".to_vec()),
        Just(b"K".to_vec()),
        Just(b"S".to_vec()),
        proptest::collection::vec(any::<u8>(), 1..16),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        4 => (0usize..16, proptest::sample::select(FIELDS.to_vec()), field_bytes())
            .prop_map(|(block, offset, bytes)| Mutation::Field { block, offset, bytes }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..600))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (0usize..16, 0usize..16).prop_map(|(from, to)| Mutation::Splice { from, to }),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation, fix_checksums: bool) {
    if data.is_empty() {
        return;
    }
    match m {
        Mutation::Flip { at, mask } => {
            let i = at % data.len();
            data[i] ^= mask;
        }
        Mutation::Field {
            block,
            offset,
            bytes,
        } => {
            let blocks = data.len() / 512;
            if blocks == 0 {
                return;
            }
            let start = (block % blocks) * 512;
            let at = start + offset;
            let end = (at + bytes.len()).min(start + 512).min(data.len());
            data[at..end].copy_from_slice(&bytes[..end - at]);
            if fix_checksums {
                // Recompute the checksum so the mutation reaches the parser's later checks.
                let sum: u32 = data[start..start + 512]
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| {
                        if (148..156).contains(&i) {
                            32
                        } else {
                            b as u32
                        }
                    })
                    .sum();
                let text = format!("{sum:06o}\0 ");
                data[start + 148..start + 156].copy_from_slice(text.as_bytes());
            }
        }
        Mutation::Truncate { at } => {
            let i = at % data.len();
            data.truncate(i);
        }
        Mutation::Insert { at, bytes } => {
            let i = at % (data.len() + 1);
            data.splice(i..i, bytes.iter().copied());
        }
        Mutation::Splice { from, to } => {
            let blocks = data.len() / 512;
            if blocks == 0 {
                return;
            }
            let (f, t) = ((from % blocks) * 512, (to % blocks) * 512);
            let block = data[f..f + 512].to_vec();
            data[t..t + 512].copy_from_slice(&block);
        }
    }
}

// ------------------------------------------------------------------ the arena

/// Path → (inode, mode, uid, nlink, mtime ns, ctime ns, content or link target).
type Snapshot = BTreeMap<PathBuf, (u64, u32, u32, u32, i64, i64, Vec<u8>)>;

/// `base/root` (extraction) beside `base/sentinel` (watched).
struct Arena {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    before: Snapshot,
}

fn outside(base: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    let below = testkit::walk_except(base, &[base.join("root")])
        .into_iter()
        .map(|f| f.path);
    for p in std::iter::once(base.to_path_buf()).chain(below) {
        let m = fs::symlink_metadata(&p).unwrap();
        let content = if m.is_dir() {
            Vec::new()
        } else if m.file_type().is_symlink() {
            fs::read_link(&p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else {
            fs::read(&p).unwrap()
        };
        out.insert(
            p,
            (
                m.ino(),
                m.mode(),
                m.uid(),
                m.nlink() as u32,
                m.mtime_nsec() + m.mtime() * 1_000_000_000,
                m.ctime_nsec() + m.ctime() * 1_000_000_000,
                content,
            ),
        );
    }
    out
}

impl Arena {
    fn new() -> Arena {
        let tmp = tempfile::Builder::new()
            .prefix("vrun-prop-")
            .tempdir()
            .unwrap();
        let base = tmp.path().join("b");
        fs::create_dir_all(base.join("sentinel/sub")).unwrap();
        fs::write(base.join("sentinel/x"), b"sentinel").unwrap();
        fs::write(base.join("sentinel/sub/y"), b"deeper").unwrap();
        std::os::unix::fs::symlink("x", base.join("sentinel/l")).unwrap();
        fs::create_dir(base.join("root")).unwrap();
        let before = outside(&base);
        Arena {
            _tmp: tmp,
            base,
            before,
        }
    }
    fn root(&self) -> PathBuf {
        self.base.join("root")
    }
    /// Empty the root (not recreate it: the arena dir's own times are watched). Tests run
    /// as root, so read-only directories left by an image do not get in the way.
    fn reset(&self) {
        for e in fs::read_dir(self.root()).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                fs::remove_dir_all(&p).unwrap();
            } else {
                fs::remove_file(&p).unwrap();
            }
        }
    }
    fn check(&self) -> Result<(), TestCaseError> {
        let now = outside(&self.base);
        if now != self.before {
            let changed: Vec<_> = now
                .keys()
                .chain(self.before.keys())
                .filter(|k| now.get(*k) != self.before.get(*k))
                .collect();
            return Err(TestCaseError::fail(format!(
                "WRITE OUTSIDE THE ROOT: {changed:?}"
            )));
        }
        Ok(())
    }
}

/// A successful build extraction obeys the build rules.
fn check_build_tree(root: &Path) -> Result<(), TestCaseError> {
    for found in testkit::walk(root) {
        let (p, m) = (&found.path, &found.meta);
        let ft = m.file_type();
        let rel = &found.rel;
        prop_assert_eq!((m.uid(), m.gid()), (UID, GID), "owner of {:?}", rel);
        if !ft.is_symlink() {
            prop_assert_eq!(m.mode() & 0o7022, 0, "mode {:o} of {:?}", m.mode(), rel);
        }
        prop_assert!(
            ft.is_dir() || ft.is_file() || ft.is_symlink(),
            "special file {:?}",
            rel
        );
        if ft.is_symlink() {
            let target = fs::read_link(p).unwrap();
            prop_assert!(!target.is_absolute(), "{:?} -> {:?}", rel, target);
            // Lexically, from the link's dir, it never climbs above the root.
            let mut depth = rel.components().count() as i64 - 1;
            for c in target.components() {
                match c {
                    Component::ParentDir => depth -= 1,
                    Component::Normal(_) => depth += 1,
                    _ => {}
                }
                prop_assert!(depth >= 0, "{:?} -> {:?} leaves the tree", rel, target);
            }
        }
    }
    Ok(())
}

/// Inputs accepted (extracted, or rendered), per property.
static ACCEPTED: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

fn report(i: usize, what: &str) {
    let n = ACCEPTED[i].load(Ordering::Relaxed);
    eprintln!("{what}: {} cases, {n} accepted", cases());
    assert!(n > 0, "{what}: no mutated input was ever accepted");
}

fn one_case(arena: &Arena, data: &[u8], build: bool, counter: usize) -> Result<(), TestCaseError> {
    arena.reset();
    let mode = if build {
        Mode::Build { uid: UID, gid: GID }
    } else {
        Mode::Image
    };
    let limits = Limits {
        max_bytes: 16 << 20,
        ..Limits::default()
    };
    let result = decode::open(data)
        .map_err(|e| vrun::errors::chain(&e))
        .and_then(|(_, r)| {
            extract(r, &arena.root(), mode, &limits).map_err(|e| vrun::errors::chain(&e))
        });
    arena.check()?;
    if result.is_ok() {
        ACCEPTED[counter].fetch_add(1, Ordering::Relaxed);
        if build {
            check_build_tree(&arena.root())?;
        }
    }
    Ok(())
}

#[test]
fn mutated_tar_streams_never_panic_or_escape() {
    let arena = Arena::new();
    let strategy = (
        0..seeds().len(),
        proptest::collection::vec(mutation(), 1..4),
        any::<bool>(),
        any::<bool>(),
    );
    runner()
        .run(&strategy, |(seed, muts, fix, build)| {
            let mut data = seeds()[seed].clone();
            for m in &muts {
                apply(&mut data, m, fix);
            }
            one_case(&arena, &data, build, 0)
        })
        .unwrap();
    report(0, "tar streams");
}

#[test]
fn mutated_compressed_streams_never_panic_or_escape() {
    let arena = Arena::new();
    let strategy = (
        0..compressed_seeds().len(),
        proptest::collection::vec(mutation(), 1..3),
        any::<bool>(),
    );
    runner()
        .run(&strategy, |(seed, muts, build)| {
            let mut data = compressed_seeds()[seed].clone();
            for m in &muts {
                apply(&mut data, m, false);
            }
            one_case(&arena, &data, build, 1)
        })
        .unwrap();
    report(1, "compressed streams");
}

// ------------------------------------------------------------------ proc.yaml

const PROC_YAML: &str = r#"app_name: myapp
version: v1.2
config_name: prod
release_hash: abc123
proc_name: web
port: 8000
host: localhost
user: nobody
group: nogroup
cmd: "python -m http.server $PORT"
env:
  GREETING: hello
  HOME_COPY: $HOME
  N: 42
settings:
  db: {host: db.local, port: 5432}
  flags: [yes, on, '1:20']
build_url: http://127.0.0.1:1/build.tgz
build_md5: 0123456789abcdef0123456789abcdef
image_name: ubuntu-core
image_url: http://127.0.0.1:1/image.tgz
volumes:
  - [/tmp, /data]
  - [/tmp, /logs]
mem_limit: 256M
memsw_limit: 512M
"#;

/// Characters that change YAML structure or break line-based config files.
const NASTY: &[&str] = &[
    "\n",
    "\r",
    "\0",
    "\r\n",
    ":",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "#",
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "'",
    "\"",
    "|",
    ">",
    "%",
    "@",
    "`",
    "\\",
    "\t",
    " ",
    "..",
    "/",
    "\u{2028}",
    "\u{85}",
    "\u{feff}",
    "~",
    "null",
    "0x10",
    "1e9",
    "-1",
    "99999999999999999999",
    "<<: ",
    "lxc.cap.drop = \n",
    "\nlxc.hook.pre-start = /bin/sh",
];

#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, String),
    Delete(usize, usize),
    Replace(usize, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    let piece = prop_oneof![
        3 => proptest::sample::select(NASTY.to_vec()).prop_map(str::to_string),
        1 => "[ -~]{1,8}",
        1 => any::<char>().prop_map(|c| c.to_string()),
    ];
    prop_oneof![
        (any::<usize>(), piece.clone()).prop_map(|(at, s)| Edit::Insert(at, s)),
        (any::<usize>(), 1usize..20).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), piece).prop_map(|(at, s)| Edit::Replace(at, s)),
    ]
}

fn apply_edit(doc: &mut String, e: &Edit) {
    let clamp = |doc: &String, at: usize| {
        let mut i = at % (doc.len() + 1);
        while !doc.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    match e {
        Edit::Insert(at, s) => {
            let i = clamp(doc, *at);
            doc.insert_str(i, s);
        }
        Edit::Delete(at, n) => {
            let i = clamp(doc, *at);
            let j = clamp(doc, i + n);
            if j > i {
                doc.replace_range(i..j, "");
            }
        }
        Edit::Replace(at, s) => {
            let i = clamp(doc, *at);
            let j = clamp(doc, i + s.len());
            doc.replace_range(i..j.max(i), s);
        }
    }
}

#[test]
fn mutated_proc_yaml_never_panics_or_injects() {
    let path = Path::new("/nonexistent/proc.yaml");
    // The unmutated document is accepted (so mutations start from a real one).
    let config = vrun::config::ProcConfig::parse(path, PROC_YAML).unwrap();
    assert_eq!(
        config.container_name().unwrap(),
        "myapp-v1.2-prod-abc123-web-8000"
    );
    let user = vrun::lxc::ProcUser {
        uid: 1000,
        gid: 1000,
        groups: vec![1000],
        is_root: false,
    };
    runner()
        .run(&proptest::collection::vec(edit(), 1..6), |edits| {
            let mut doc = PROC_YAML.to_string();
            for e in &edits {
                apply_edit(&mut doc, e);
            }
            let Ok(config) = vrun::config::ProcConfig::parse(path, &doc) else {
                return Ok(());
            };
            let Ok(name) = config.container_name() else {
                return Ok(());
            };
            prop_assert!(
                !name.contains(['/', '\0', '\n', '\r']) && !name.split('-').any(|p| p == ".."),
                "accepted container name {:?}",
                name
            );
            let volumes: Vec<_> = config
                .volumes
                .iter()
                .map(|(h, c)| vrun::lxc::Volume::new(h, c.clone()))
                .collect();
            let spec = vrun::lxc::ContainerSpec {
                hostname: &name,
                rootfs: PathBuf::from("/srv/vr/procs").join(&name).join("rootfs"),
                host_system_dirs: Vec::new(),
                user: &user,
                volumes: &volumes,
                mem_limit: config.mem_limit,
                memsw_limit: config.memsw_limit,
                v1_memsw: true,
            };
            if let Ok(text) = vrun::lxc::render_config(&spec) {
                ACCEPTED[2].fetch_add(1, Ordering::Relaxed);
                for line in text.lines() {
                    prop_assert!(
                        line.is_empty() || line.starts_with("lxc.") || line.starts_with('#'),
                        "injected line {:?} in\n{}",
                        line,
                        text
                    );
                }
                prop_assert!(!text.contains('\r') && !text.contains('\0'));
            }
            Ok(())
        })
        .unwrap();
    report(2, "proc.yaml documents");
}
