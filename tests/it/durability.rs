//! Publish waits for vrun's own data only (issue 14 point 9).
//!
//! vr.runners never made a download durable. vrun's first versions did with `syncfs`,
//! which writes back every dirty page of the filesystem: with another process writing to
//! the same filesystem (the apps, on a shared /apps), publishing a 200 KB build took
//! 3.6 s, once 10 s. vrun now fsyncs the files it wrote. The proof here is not a timing:
//! a bystander process's data, written before the setup and never synced, must still be
//! dirty in the page cache after the setup published (the kernel's `cachestat(2)` counts
//! a file's dirty pages; a `syncfs` would have written them all). The bystander keeps
//! writing during the setup too. The filesystem is a fresh loop-mounted ext4 made here.
//! Publish times, quiet and busy, are measured by `cargo bench -p vrun-cache --bench
//! publish`.

use crate::common;

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::TestDir;
use testkit::serve::{Server, ServerOptions};

/// A loop-mounted ext4 of its own; unmounted (and its loop device freed) on drop.
struct Ext4 {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ext4 {
    fn new(mb: u64) -> Ext4 {
        let dir = tempfile::Builder::new()
            .prefix("vrun-ext4-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("fs.img");
        fs::File::create(&img).unwrap().set_len(mb << 20).unwrap();
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        Ext4 { mnt, _dir: dir }
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// (pages in the page cache, dirty or under writeback) of `len` bytes of `file` from 0.
fn dirty_pages(file: &fs::File, len: u64) -> (u64, u64) {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    let range = Range { off: 0, len };
    let mut st = Stat::default();
    // SAFETY: cachestat(2) (Linux 6.5) with valid pointers to repr(C) structs.
    let rc = unsafe {
        libc::syscall(
            451, // __NR_cachestat on x86_64 and aarch64
            file.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0,
        )
    };
    assert_eq!(rc, 0, "cachestat: {}", std::io::Error::last_os_error());
    (st.cache, st.dirty + st.writeback)
}

fn small_build() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("Procfile"), "web: ./run\n").unwrap();
    for i in 0..20 {
        fs::write(dir.path().join(format!("f{i}")), vec![i as u8; 10_000]).unwrap();
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg("tar -cf - -C \"$0\" . | gzip -c")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn publish_does_not_write_back_another_process_s_dirty_data() {
    let fs4 = Ext4::new(600);
    let t = TestDir::new();
    let root = fs4.mnt.join("vr root");
    let build = small_build();
    let server = Server::start([("/b.tar.gz", build)], ServerOptions::default()).unwrap();

    // The bystander: 64 MiB written and not synced, then more while the setup runs.
    const BEFORE: u64 = 64 << 20;
    let by_path = fs4.mnt.join("app-data.bin");
    let mut by = fs::File::create(&by_path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..(BEFORE >> 20) {
        by.write_all(&chunk).unwrap();
    }
    let (cached, dirty_before) = dirty_pages(&by, BEFORE);
    assert!(
        dirty_before * 10 >= cached * 9,
        "the bystander's data is dirty: {dirty_before}/{cached}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut by = by.try_clone().unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                by.write_all(&vec![0xa5u8; 256 << 10]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
    };

    let file = t.write(
        "proc.yaml",
        &format!(
            "app_name: shop\nversion: v7\nconfig_name: prod\nrelease_hash: abc123\n\
             proc_name: web\nport: 5000\nuser: nobody\ngroup: nogroup\nbuild_url: \"{}\"\n",
            server.url("/b.tar.gz")
        ),
    );
    let r = t
        .vrun([Path::new("setup"), Path::new("--timings"), &file])
        .env("VR_ROOT", &root)
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .run();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    r.assert_ok();
    let (cached, dirty_after) = dirty_pages(&by, BEFORE);
    // A syncfs would have left none of them dirty. The kernel's own writeback may take
    // some (it starts on its own past dirty_background thresholds): most must remain.
    assert!(
        dirty_after * 2 >= dirty_before,
        "setup wrote back the bystander's data: {dirty_after} of {dirty_before} pages still dirty ({cached} cached)"
    );
    // And the build is published, durably, on that filesystem.
    let layers = fs::read_dir(root.join("cache").join(common::layers_bucket()))
        .unwrap()
        .count();
    assert_eq!(layers, 1);
}
