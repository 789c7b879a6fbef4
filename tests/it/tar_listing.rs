//! Property (issue 13): for archives with hostile header fields, the names vrun extracts
//! are exactly the names `tar -tf` (GNU tar 1.34) lists — or vrun refuses.
//!
//! The archives are sequences of headers written byte by byte: entries of every type
//! with sizes that do not fit them (data after directories, symlinks, hard links,
//! devices), data that holds a well-formed header (the bait of a parser differential),
//! PAX records with newlines in values, wrong lengths and missing newlines, PAX globals,
//! GNU long names and links, duplicated extension headers, old-GNU and PAX sparse maps,
//! volume labels, unknown types, and sometimes no end marker.
//!
//! When vrun extracts (image mode: the most permissive rules), GNU tar must have listed
//! the archive without an error, and every listed name (volume labels and the device
//! nodes images skip aside) must be in vrun's tree, which holds nothing else but the
//! parents of listed names. `PROPTEST_CASES` sets the number of cases (default 600,
//! about 5 s); the test fails if no case was ever extracted.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vrun::extract::{extract, Limits, Mode};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

// ------------------------------------------------------------------ writing

fn checksum(h: &mut [u8; 512]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn header(name: &[u8], kind: u8, size: u64, link: &[u8], gnu: bool) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"13000000000\0");
    h[156] = kind;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    if gnu {
        h[257..265].copy_from_slice(b"ustar  \0");
    } else {
        h[257..265].copy_from_slice(b"ustar\x0000");
    }
    checksum(&mut h);
    h
}

fn push(out: &mut Vec<u8>, h: &[u8; 512], data: &[u8]) {
    out.extend_from_slice(h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// One PAX record, its length off by `delta` (0 = correct), its newline kept or not.
fn record(key: &[u8], value: &[u8], delta: i8, newline: bool) -> Vec<u8> {
    let nl: &[u8] = if newline { b"\n" } else { b"" };
    let body = [b" ", key, b"=", value, nl].concat();
    let mut n = body.len() + 1;
    while n.to_string().len() + body.len() != n {
        n += 1;
    }
    let n = (n as i64 + i64::from(delta)).max(0);
    [n.to_string().as_bytes(), &body].concat()
}

// ------------------------------------------------------------------ generating

const NAMES: [&[u8]; 10] = [
    b"a",
    b"b/c",
    b"d/",
    b"e\nf",
    b"/abs",
    b"./g",
    b"h i",
    b"dir/sub/file",
    b"a",
    b"x/yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy",
];

fn name() -> impl Strategy<Value = Vec<u8>> {
    proptest::sample::select(NAMES.to_vec()).prop_map(<[u8]>::to_vec)
}

#[derive(Debug, Clone)]
enum Data {
    Zeros,
    Text,
    /// A valid header for `hidden`, then its data: bait for a reader that is off by
    /// whole blocks.
    Bait,
}

#[derive(Debug, Clone)]
enum Item {
    Entry {
        kind: u8,
        name: Vec<u8>,
        size: u64,
        link: Vec<u8>,
        data: Data,
        gnu: bool,
    },
    Pax {
        global: bool,
        records: Vec<(Vec<u8>, Vec<u8>, i8, bool)>,
    },
    Long {
        kind: u8,
        name: Vec<u8>,
    },
    /// An old-GNU sparse file: (offset, len) slots, the real size, the isextended flag.
    GnuSparse {
        name: Vec<u8>,
        slots: Vec<(u64, u64)>,
        real: u64,
        extended: bool,
    },
    /// PAX 1.0 sparse: the map lines in the data.
    PaxSparse {
        name: Vec<u8>,
        map: Vec<u64>,
        real: u64,
        data: u64,
    },
}

fn pax_record() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, i8, bool)> {
    let keys: Vec<&[u8]> = vec![
        b"path",
        b"linkpath",
        b"size",
        b"mtime",
        b"uid",
        b"comment",
        b"SCHILY.xattr.user.k",
        b"GNU.sparse.major",
        b"GNU.sparse.minor",
        b"GNU.sparse.name",
        b"GNU.sparse.realsize",
        b"GNU.sparse.numblocks",
        b"GNU.sparse.offset",
        b"GNU.sparse.numbytes",
        b"GNU.sparse.map",
    ];
    let values: Vec<&[u8]> = vec![
        b"p",
        b"q/r",
        b"two\nlines",
        b"0",
        b"1",
        b"512",
        b"1024",
        b"-1",
        b"1.5",
        b"0,512,1024,0",
        b"x",
        b"",
        b"v\0w",
    ];
    (
        proptest::sample::select(keys),
        proptest::sample::select(values),
        prop_oneof![8 => Just(0i8), 1 => -2i8..=2],
        prop_oneof![9 => Just(true), 1 => Just(false)],
    )
        .prop_map(|(k, v, d, nl)| (k.to_vec(), v.to_vec(), d, nl))
}

fn item() -> impl Strategy<Value = Item> {
    let kinds = vec![
        b'0', b'0', b'0', 0, b'1', b'2', b'3', b'4', b'5', b'5', b'6', b'7', b'D', b'V', b'M', b'Z',
    ];
    let sizes = vec![0u64, 0, 0, 0, 0, 1, 100, 511, 512, 513, 1024, 2000];
    prop_oneof![
        9 => (
            proptest::sample::select(kinds),
            name(),
            proptest::sample::select(sizes),
            name(),
            prop_oneof![Just(Data::Zeros), Just(Data::Text), Just(Data::Bait)],
            any::<bool>(),
        )
            .prop_map(|(kind, name, size, link, data, gnu)| Item::Entry {
                kind,
                name,
                size,
                link,
                data,
                gnu
            }),
        2 => (any::<bool>(), proptest::collection::vec(pax_record(), 1..4))
            .prop_map(|(g, records)| Item::Pax {
                global: g && records.len() == 1,
                records
            }),
        1 => (prop_oneof![Just(b'L'), Just(b'K')], name())
            .prop_map(|(kind, name)| Item::Long { kind, name }),
        1 => (
            name(),
            proptest::collection::vec(
                (proptest::sample::select(vec![0u64, 512, 1000, 4096]),
                 proptest::sample::select(vec![0u64, 1, 512, 700])),
                0..5
            ),
            proptest::sample::select(vec![0u64, 1024, 4096, 5000]),
            any::<bool>(),
        )
            .prop_map(|(name, slots, real, extended)| Item::GnuSparse {
                name,
                slots,
                real,
                extended
            }),
        1 => (
            name(),
            proptest::collection::vec(proptest::sample::select(vec![0u64, 1, 2, 512, 1024]), 0..6),
            proptest::sample::select(vec![0u64, 1024, 1536]),
            proptest::sample::select(vec![0u64, 512, 1024]),
        )
            .prop_map(|(name, map, real, data)| Item::PaxSparse {
                name,
                map,
                real,
                data
            }),
    ]
}

fn data_of(d: &Data, size: u64) -> Vec<u8> {
    let mut v = match d {
        Data::Zeros => vec![0u8; size as usize],
        Data::Text => (0..size).map(|i| b'a' + (i % 26) as u8).collect(),
        Data::Bait => {
            let mut v = Vec::new();
            push(&mut v, &header(b"hidden", b'0', 4, b"", false), b"evil");
            v
        }
    };
    v.resize(size as usize, 0);
    v
}

fn build(items: &[Item], end: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for it in items {
        match it {
            Item::Entry {
                kind,
                name,
                size,
                link,
                data,
                gnu,
            } => push(
                &mut out,
                &header(name, *kind, *size, link, *gnu),
                &data_of(data, *size),
            ),
            Item::Pax { global, records } => {
                let body: Vec<u8> = records
                    .iter()
                    .flat_map(|(k, v, d, nl)| record(k, v, *d, *nl))
                    .collect();
                let kind = if *global { b'g' } else { b'x' };
                push(
                    &mut out,
                    &header(b"PaxHeaders/x", kind, body.len() as u64, b"", false),
                    &body,
                );
            }
            Item::Long { kind, name } => {
                let mut body = name.clone();
                body.push(0);
                push(
                    &mut out,
                    &header(b"././@LongLink", *kind, body.len() as u64, b"", true),
                    &body,
                );
            }
            Item::GnuSparse {
                name,
                slots,
                real,
                extended,
            } => {
                let stored: u64 = slots.iter().map(|s| s.1).sum();
                let mut h = header(name, b'S', stored, b"", true);
                for (i, (off, len)) in slots.iter().take(4).enumerate() {
                    let at = 386 + 24 * i;
                    h[at..at + 12].copy_from_slice(format!("{off:011o}\0").as_bytes());
                    h[at + 12..at + 24].copy_from_slice(format!("{len:011o}\0").as_bytes());
                }
                h[482] = u8::from(*extended || slots.len() > 4);
                h[483..495].copy_from_slice(format!("{real:011o}\0").as_bytes());
                checksum(&mut h);
                out.extend_from_slice(&h);
                if h[482] != 0 {
                    let mut ext = [0u8; 512];
                    for (i, (off, len)) in slots.iter().skip(4).enumerate() {
                        let at = 24 * i;
                        ext[at..at + 12].copy_from_slice(format!("{off:011o}\0").as_bytes());
                        ext[at + 12..at + 24].copy_from_slice(format!("{len:011o}\0").as_bytes());
                    }
                    out.extend_from_slice(&ext);
                }
                let data: Vec<u8> = (0..stored).map(|i| b'A' + (i % 26) as u8).collect();
                out.extend_from_slice(&data);
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
            Item::PaxSparse {
                name,
                map,
                real,
                data,
            } => {
                let mut text = format!("{}\n", map.len() / 2);
                for n in map {
                    text.push_str(&format!("{n}\n"));
                }
                let mut body = text.into_bytes();
                body.resize(body.len().div_ceil(512) * 512, 0);
                body.extend((0..*data).map(|i| b'a' + (i % 26) as u8));
                let recs = [
                    record(b"GNU.sparse.major", b"1", 0, true),
                    record(b"GNU.sparse.minor", b"0", 0, true),
                    record(b"GNU.sparse.name", name, 0, true),
                    record(b"GNU.sparse.realsize", real.to_string().as_bytes(), 0, true),
                ]
                .concat();
                push(
                    &mut out,
                    &header(b"PaxHeaders/s", b'x', recs.len() as u64, b"", false),
                    &recs,
                );
                push(
                    &mut out,
                    &header(b"GNUSparseFile.0/s", b'0', body.len() as u64, b"", false),
                    &body,
                );
            }
        }
    }
    if end {
        out.extend_from_slice(&[0u8; 1024]);
    }
    out
}

// ------------------------------------------------------------------ comparing

/// `tar -t` prints names with GNU's default `escape` quoting.
fn unescape(line: &str) -> Vec<u8> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'\\' => out.push(b'\\'),
                c if c.is_ascii_digit() && i + 3 < b.len() => {
                    let v = u8::from_str_radix(&line[i + 1..i + 4], 8).unwrap_or(b'?');
                    out.push(v);
                    i += 4;
                    continue;
                }
                c => out.push(c),
            }
            i += 2;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Drop leading `/` and `./`, empty and `.` components, and the trailing `/`.
fn normal(name: &[u8]) -> Vec<u8> {
    let parts: Vec<&[u8]> = name
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    parts.join(&b'/')
}

/// GNU tar's listing: (names, type letters of `tar -tv`), or `None` if it failed.
fn gnu_list(archive: &Path) -> Option<Vec<(Vec<u8>, u8)>> {
    let run = |verbose: bool| {
        let out = Command::new("tar")
            .env("LC_ALL", "C")
            .arg(if verbose { "-tvf" } else { "-tf" })
            .arg(archive)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // Warnings that do not change what is listed are fine; errors are not.
        let clean = String::from_utf8_lossy(&out.stderr).lines().all(|l| {
            l.contains("Removing leading")
                || l.contains("Ignoring unknown extended header")
                || l.contains("A lone zero block")
                || l.contains("Substituting `.' for empty member name")
        });
        (out.status.success() && clean).then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (names, long) = (run(false)?, run(true)?);
    let names: Vec<&str> = names.lines().collect();
    let types: Vec<u8> = long.lines().map(|l| l.as_bytes()[0]).collect();
    if names.len() != types.len() {
        return None;
    }
    Some(
        names
            .iter()
            .zip(types)
            .map(|(n, t)| (unescape(n), t))
            .collect(),
    )
}

fn tree(root: &Path) -> BTreeSet<Vec<u8>> {
    testkit::walk(root)
        .into_iter()
        .map(|f| f.rel.as_os_str().as_encoded_bytes().to_vec())
        .collect()
}

#[test]
fn extracted_names_are_the_names_gnu_tar_lists_or_vrun_refuses() {
    let tmp = tempfile::Builder::new()
        .prefix("vrun-listing-")
        .tempdir()
        .unwrap();
    let archive = tmp.path().join("a.tar");
    let root = tmp.path().join("root");
    let accepted = std::cell::Cell::new(0u32);
    let refused = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(item(), 1..7),
        prop_oneof![9 => Just(true), 1 => Just(false)],
    );
    runner
        .run(&strategy, |(items, end)| {
            let bytes = build(&items, end);
            fs::write(&archive, &bytes).unwrap();
            if root.exists() {
                fs::remove_dir_all(&root).unwrap();
            }
            fs::create_dir(&root).unwrap();
            let limits = Limits {
                max_bytes: 1 << 20,
                ..Limits::default()
            };
            let ours = extract(&bytes[..], &root, Mode::Image, &limits);
            if let Err(e) = &ours {
                if std::env::var_os("TAR_LISTING_DEBUG").is_some() {
                    eprintln!("REFUSED {e}");
                }
                refused.set(refused.get() + 1);
                return Ok(());
            }
            accepted.set(accepted.get() + 1);
            let listed = gnu_list(&archive);
            prop_assert!(
                listed.is_some(),
                "vrun extracted what GNU tar cannot list cleanly"
            );
            let listed: BTreeSet<Vec<u8>> = listed
                .unwrap()
                .into_iter()
                .filter(|(_, t)| !matches!(t, b'V' | b'c' | b'b' | b'p'))
                .map(|(n, _)| normal(&n))
                .filter(|n| !n.is_empty())
                .collect();
            let got = tree(&root);
            for n in &listed {
                prop_assert!(
                    got.contains(n),
                    "GNU tar lists {:?}, vrun did not extract it; vrun: {:?}",
                    String::from_utf8_lossy(n),
                    got
                );
            }
            for g in &got {
                let parent_of_listed = listed
                    .iter()
                    .any(|n| n.len() > g.len() && n.starts_with(g) && n[g.len()] == b'/');
                prop_assert!(
                    listed.contains(g) || parent_of_listed,
                    "vrun extracted {:?}, which GNU tar does not list: {:?}",
                    String::from_utf8_lossy(g),
                    listed
                );
            }
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.get(), refused.get());
    eprintln!("{} cases: {accepted} extracted, {refused} refused", cases());
    assert!(accepted > 0, "no generated archive was ever extracted");
}
