//! Start writing vrun's own files to disk while the download goes on, so that publish's
//! fsyncs find little left to wait for.
//!
//! Why. Durability is an fsync of every file and directory of a layer at publish
//! (`vrun-cache`'s `fsync_tree`): it waits only for what vrun wrote, where the `syncfs`
//! used before waited for every dirty page of the filesystem, so another process writing
//! to the same filesystem (the apps, on a shared /apps) made publishing a 200 KB build take
//! 3.6 s (issue 14). But an fsync per file on a cold tree would write everything at the
//! end, which the background `syncfs` had avoided: the disk worked while the CPU decoded.
//! So each finished file is handed here, and one thread asks the kernel to start its
//! writeback (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: no wait, no journal commit, and
//! only this file's pages). It runs on its own thread because starting writeback can
//! block on block allocation, which on the writer threads made extraction slower (the
//! earlier per-file attempt: download 1.6 → 2.3 s). An EROFS image gets the same, range
//! by range, from its sink; the blob gets none (it is a cache the setup does not wait
//! for: see the `pipeline` note).
//!
//! The hand-over is a dup of the fd into a bounded queue; when the queue is full the hint
//! is dropped (the fsync at publish still makes the file durable). One thread per
//! process serves every extraction (build and image run at once).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

/// Files waiting for their writeback kick at most (fds held open meanwhile).
const QUEUE: usize = 256;

static KICKER: OnceLock<Option<crossbeam_channel::Sender<File>>> = OnceLock::new();

fn kicker() -> Option<&'static crossbeam_channel::Sender<File>> {
    KICKER
        .get_or_init(|| {
            let (tx, rx) = crossbeam_channel::bounded::<File>(QUEUE);
            std::thread::Builder::new()
                .name("vrun-writeback".into())
                .spawn(move || {
                    for file in rx {
                        start_writeback(&file, 0, 0);
                    }
                })
                .ok()?;
            Some(tx)
        })
        .as_ref()
}

/// A file vrun finished writing: start its writeback soon (best effort).
pub fn written(file: &File) {
    if let Some(tx) = kicker() {
        if let Ok(dup) = file.try_clone() {
            let _ = tx.try_send(dup);
        }
    }
}

/// `sync_file_range(fd, offset, len, SYNC_FILE_RANGE_WRITE)`: start writing back that
/// range's dirty pages without waiting (`len` 0: to the end). Errors are ignored: this
/// is a head start, the fsync at publish is what reports them.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on a valid open fd.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}
