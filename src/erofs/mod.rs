//! EROFS images: one sequential file per layer instead of thousands of inodes.
//!
//! On a slow disk, extracting a build costs one small write per file plus the metadata of
//! every inode and directory; an EROFS image of the same tree is one file written front to
//! back, then mounted read-only. This module has the two halves: [`ImageWriter`], which
//! streams resolved entries (archive order, data as it arrives) into an uncompressed
//! image, and [`mount`], which mounts such an image (file-backed, else through a loop
//! device), finds existing mounts of it, and probes whether this host can do either.
//! Policies (which names, owners and modes an archive may have) are not here: the writer
//! takes entries that a policy has already resolved, and refuses only what would make an
//! invalid image (a bad name, a path through a non-directory, an unstorable xattr), with an
//! error naming the entry. Debian 12 ships erofs-utils 1.5, which has no `--tar` mode, so
//! there is nothing to stream through; hence our own writer.
//!
//! # Format facts relied on (kernel `fs/erofs/erofs_fs.h`, `inode.c`, `data.c`, `dir.c`)
//!
//! - The superblock is 128 bytes at byte 1024 of block 0; blocks are 4 KiB (`blkszbits`
//!   12: the page size, accepted by every kernel and by fsck.erofs 1.5).
//! - An inode is named by its nid: byte `meta_blkaddr * 4096 + nid * 32`. The root's nid is
//!   16 bits in the superblock; dirents carry 64-bit nids. Compact inodes are 32 bytes
//!   (16-bit uid/gid/nlink, 32-bit size, and *no* mtime: they show the superblock's
//!   `build_time`); extended ones are 64 bytes (32-bit ids, 64-bit size, mtime with ns).
//! - Data layouts used: `FLAT_PLAIN` (contiguous blocks from `raw_blkaddr`),
//!   `FLAT_INLINE` (the same, but the last partial block sits right after the inode and
//!   its xattrs — the kernel refuses it if it crosses a block boundary: "inline data cross
//!   block boundary"), and `CHUNK_BASED` with a 4-byte block map (`chunkbits` in `i_u`, the
//!   map right after the xattrs; an entry of `0xFFFFFFFF` is a hole; needs
//!   `INCOMPAT_CHUNKED_FILE`, kernel ≥ 5.15, erofs-utils ≥ 1.4).
//! - Directory data is blocks of 12-byte dirents followed by their names (not
//!   NUL-terminated; the first dirent's `nameoff` / 12 is the count). `.` and `..` are
//!   real entries. Names are sorted bytewise across *all* blocks: lookup binary-searches
//!   the blocks by their first name, then the names inside one. Directory `nlink` is
//!   2 + subdirectories, as on other filesystems.
//! - Xattrs: a 12-byte body header, 4-byte ids into the shared area (at `xattr_blkaddr`,
//!   id = byte offset / 4), then inline entries (`len, prefix index, value size, name,
//!   value`, 4-byte aligned). Only names with a short prefix index can be stored without
//!   the long-prefix table: `user.`, `trusted.`, `security.`, `system.posix_acl_access`,
//!   `system.posix_acl_default`. Anything else is refused.
//! - The kernel reports `st_blocks` as the size rounded up to blocks for every
//!   uncompressed file, so a hole is visible through `SEEK_DATA`/`SEEK_HOLE` and in the
//!   image size, not in `st_blocks`. Symlink modes are always stored as 0777 (what every
//!   Linux filesystem shows).
//!
//! # Layout, and why
//!
//! ```text
//! block 0: superblock (1024..1152) + root inode (nid 36; meta_blkaddr = 0)
//! then, as entries arrive:  [file data, block-aligned][file data]…[slab][file data]…[slab]
//! at finish:                [directory blocks][directory inodes][shared xattrs]
//! last: block 0 written in place, link counts patched, one fsync
//! ```
//!
//! File data is written sequentially as it arrives, each file on whole blocks. A regular
//! file's inode (with its xattrs and, where it pays, its tail) goes into a *slab*: a 4 KiB
//! metadata block kept in memory and appended to the stream when the next inode does not
//! fit. So the inode follows its data and the tail follows its inode; nothing of a file
//! stays in memory once its slab is written (nids are assigned then). This differs from
//! "all inodes at the end" on purpose: an inline tail must sit next to its inode, and
//! keeping every file's tail in memory until the end would cost up to 4 KiB per file
//! (≈ 24 MB for a 12k-file build). Everything whose content is known only at the end —
//! directories (sorted dirents need every name), the shared xattr area, the superblock —
//! is written at `finish`. Hard-link counts are known only then too: inodes are written
//! with nlink 1 and the few others patched in place (`pwrite` of 2–4 bytes).
//!
//! Inline tails "where it pays": a file's tail goes inline when the inode+tail fits the
//! open slab, or when starting a new slab wastes less than padding the tail to a block
//! would. Measured with `cargo bench --bench erofs` (the bench build: ~12k files, 236 MB
//! tar; 3 rounds, rotating order, caches dropped, fsync included; load average 5–6 from
//! other engineers' builds): the image is 232 MB with inline tails against 258 MB
//! without (`inline_tails: false`, what `mkfs.erofs -Enoinline_data` writes). On the
//! throttled disk (40 MiB/s, 1000 IOPS; `dd` 200 MB + fsync 5.2 s) writing is
//! bandwidth-bound and follows the bytes: median 6.40 s with inline tails, 7.57 s
//! without, against 19.89 s for `tar -xf` + `sync -f` (0.32×; 222 write bios against
//! 15 374) and 19.48 s for vrun's directory extractor. On a fresh loop ext4: 0.47 s,
//! 0.50 s, 1.83 s (tar), 2.29 s (extractor).
//!
//! The root inode lives in block 0 behind the superblock, so its nid is 36 whatever the
//! image size; its xattrs always go to the shared area so that it fits. Compact inodes are
//! used when they are exact: ids and nlink below 65536, size below 4 GiB, and mtime equal
//! to `build_time`, which is the first entry's mtime (builds often have one mtime for
//! everything); otherwise extended.
//!
//! Holes: a sparse file is chunk-based with the largest power-of-two chunk at which every
//! data/hole boundary (rounded to blocks) falls on a chunk boundary, so no hole a 4 KiB
//! filesystem could keep becomes zeros, and the map is as small as that allows. The price
//! is 4 bytes of map per chunk (a 5 GiB file with 4 KiB-aligned runs: 5 MiB of map, held
//! in memory while that one file is written).
//!
//! Replacement (tar semantics, as `extract` applies them): a later entry replaces an
//! earlier one of the same path; a directory over a directory merges (children stay, the
//! later metadata wins); a replaced directory's subtree is simply never reached at
//! finish. A replaced file's data and inode stay in the image, unreachable (counted in
//! [`ImageStats::orphans`]): the stream cannot be rewound, and archives rarely repeat a
//! path. Missing parents are made with [`WriterOptions::implicit_dir`].
//!
//! Memory: metadata only. Per entry one hash-map key (parent id + name) and a 16-byte
//! inode record; per directory its metadata; at finish one sorted vector of references.
//! Measured: 188 bytes per entry (peak RSS of writing 20k vs 120k empty files, same
//! bench), so a 12k-file build costs ~2.3 MB over the ~4 MB process floor. File data is
//! streamed through one 256 KiB buffer and never held whole.
//!
//! After an I/O or data error the writer refuses further work (its stream position is
//! unknown); the caller deletes the file. Validation errors leave it usable.
//!
//! # What the kernel requires
//!
//! `CONFIG_EROFS_FS` (and `CONFIG_EROFS_FS_XATTR` for xattrs), `CAP_SYS_ADMIN` to mount,
//! and either `CONFIG_EROFS_FS_BACKED_BY_FILE` (Linux ≥ 6.12) for a file-backed mount or
//! a usable `/dev/loop-control`. [`mount::probe`] tries both on a tiny image and says which
//! works and why not. overlayfs accepts an EROFS lower (copy-up, new files and whiteouts
//! tested in `tests/it/erofs.rs`). A policy feeding this writer should refuse or strip
//! `trusted.overlay.*` xattrs from archives: stored in a lower, overlayfs would obey them.

mod format;
pub mod mount;
mod writer;

pub use writer::{
    DirId, Entry, EntryKind, ErofsError, Extent, ImageStats, ImageWriter, Invalid, Metadata, Node,
    WriterOptions, SYMLINK_MAX,
};
