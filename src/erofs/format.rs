//! The EROFS on-disk structures this writer emits, as byte encoders.
//!
//! Source of truth: the kernel's `fs/erofs/erofs_fs.h` (all fields little-endian). Only the
//! uncompressed subset is here: superblock, compact/extended inodes, the xattr body,
//! dirents and the 4-byte chunk block map.

/// Bytes per filesystem block: `blkszbits` 12. The kernel (≥ 6.4) also takes other sizes,
/// but 4 KiB equals the page size here, which every kernel and fsck.erofs 1.5 accept.
pub const BLOCK: u64 = 4096;
pub const BLOCK_BITS: u8 = 12;

/// The superblock lives at byte 1024 of block 0 ("to allow for x86 boot sectors").
pub const SUPER_OFFSET: u64 = 1024;
pub const SUPER_SIZE: usize = 128;
pub const MAGIC: u32 = 0xE0F5_E1E2;

/// Inodes are addressed by `nid`: byte offset = meta_blkaddr * BLOCK + nid * 32.
pub const NID_UNIT: u64 = 32;

pub const COMPACT_SIZE: usize = 32;
pub const EXTENDED_SIZE: usize = 64;

pub const FEATURE_COMPAT_MTIME: u32 = 0x2;
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;

/// `i_format` data layouts (bits 1..3).
pub const LAYOUT_FLAT_PLAIN: u16 = 0;
pub const LAYOUT_FLAT_INLINE: u16 = 2;
pub const LAYOUT_CHUNK_BASED: u16 = 4;

/// A chunk whose block address is this is a hole (reads as zeros, costs no block).
pub const NULL_ADDR: u32 = u32::MAX;

pub const DIRENT_SIZE: usize = 12;
pub const XATTR_IBODY_HEADER: usize = 12;
pub const XATTR_ENTRY_HEADER: usize = 4;

/// Dirent file types (the generic `FT_*` values).
pub const FT_REG: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;

/// Xattr name prefixes with a short index in the format (`EROFS_XATTR_INDEX_*`). A name
/// outside these cannot be stored without the long-prefix table, which we do not write.
pub const XATTR_PREFIXES: &[(&[u8], u8)] = &[
    (b"user.", 1),
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"trusted.", 4),
    (b"security.", 6),
];

pub fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Everything an on-disk inode says.
#[derive(Debug, Clone)]
pub struct InodeFields {
    pub compact: bool,
    pub layout: u16,
    pub xattr_icount: u16,
    /// Full `st_mode`: type and the 12 permission bits.
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    /// `i_u`: raw block address, encoded rdev, or the chunk format.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
}

impl InodeFields {
    pub fn size_on_disk(&self) -> usize {
        if self.compact {
            COMPACT_SIZE
        } else {
            EXTENDED_SIZE
        }
    }

    /// Byte offset of `i_nlink` inside the encoded inode, and its width.
    pub fn nlink_field(compact: bool) -> (usize, usize) {
        if compact {
            (6, 2)
        } else {
            (44, 4)
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let format = u16::from(!self.compact) | (self.layout << 1);
        out.extend_from_slice(&format.to_le_bytes());
        out.extend_from_slice(&self.xattr_icount.to_le_bytes());
        out.extend_from_slice(&self.mode.to_le_bytes());
        if self.compact {
            out.extend_from_slice(&(self.nlink as u16).to_le_bytes());
            out.extend_from_slice(&(self.size as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes()); // i_reserved
            out.extend_from_slice(&self.i_u.to_le_bytes());
            out.extend_from_slice(&self.ino.to_le_bytes());
            out.extend_from_slice(&(self.uid as u16).to_le_bytes());
            out.extend_from_slice(&(self.gid as u16).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes()); // i_reserved2
        } else {
            out.extend_from_slice(&0u16.to_le_bytes()); // i_reserved
            out.extend_from_slice(&self.size.to_le_bytes());
            out.extend_from_slice(&self.i_u.to_le_bytes());
            out.extend_from_slice(&self.ino.to_le_bytes());
            out.extend_from_slice(&self.uid.to_le_bytes());
            out.extend_from_slice(&self.gid.to_le_bytes());
            out.extend_from_slice(&(self.mtime as u64).to_le_bytes());
            out.extend_from_slice(&self.mtime_nsec.to_le_bytes());
            out.extend_from_slice(&self.nlink.to_le_bytes());
            out.extend_from_slice(&[0u8; 16]);
        }
    }
}

/// The 128-byte superblock (no checksum: `EROFS_FEATURE_COMPAT_SB_CHKSUM` is not set).
#[derive(Debug, Clone, Default)]
pub struct Superblock {
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: i64,
    pub build_time_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
}

impl Superblock {
    pub fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        // 4..8 checksum: 0
        b[8..12].copy_from_slice(&self.feature_compat.to_le_bytes());
        b[12] = BLOCK_BITS;
        b[13] = 0; // sb_extslots
        b[14..16].copy_from_slice(&self.root_nid.to_le_bytes());
        b[16..24].copy_from_slice(&self.inos.to_le_bytes());
        b[24..32].copy_from_slice(&(self.build_time as u64).to_le_bytes());
        b[32..36].copy_from_slice(&self.build_time_nsec.to_le_bytes());
        b[36..40].copy_from_slice(&self.blocks.to_le_bytes());
        b[40..44].copy_from_slice(&self.meta_blkaddr.to_le_bytes());
        b[44..48].copy_from_slice(&self.xattr_blkaddr.to_le_bytes());
        b[48..64].copy_from_slice(&self.uuid);
        // 64..80 volume_name: empty
        b[80..84].copy_from_slice(&self.feature_incompat.to_le_bytes());
        // 84.. compression, devices, dirblkbits (0: directory block = fs block), prefixes,
        // packed inode: all unused here and zero.
        b
    }
}

/// One xattr as the format stores it: short prefix index, the rest of the name, the value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Xattr {
    pub index: u8,
    pub suffix: Box<[u8]>,
    pub value: Box<[u8]>,
}

impl Xattr {
    /// Encoded size of an `erofs_xattr_entry` with its name and value, 4-byte aligned.
    pub fn entry_size(&self) -> usize {
        (XATTR_ENTRY_HEADER + self.suffix.len() + self.value.len()).next_multiple_of(4)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(self.suffix.len() as u8);
        out.push(self.index);
        out.extend_from_slice(&(self.value.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.suffix);
        out.extend_from_slice(&self.value);
        out.resize(start + self.entry_size(), 0);
    }
}

/// The kernel's `new_encode_dev` for `i_u.rdev`.
pub fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Lays out the dirents of one directory (already sorted, `.` and `..` included) into
/// blocks: returns the index of the first entry of each block and the bytes used in the
/// last block. Each block holds its `erofs_dirent` array followed by the names; the first
/// dirent's `nameoff` tells the reader how many dirents the block has.
pub fn dirent_blocks<'a>(names: impl Iterator<Item = &'a [u8]>) -> (Vec<u32>, usize) {
    let mut starts = vec![0u32];
    let mut used = 0usize;
    for (i, name) in names.enumerate() {
        let need = DIRENT_SIZE + name.len();
        if used + need > BLOCK as usize {
            starts.push(i as u32);
            used = 0;
        }
        used += need;
    }
    (starts, used)
}

/// Encodes one dirent block: `entries` are (nid, file type, name).
pub fn encode_dirent_block(entries: &[(u64, u8, &[u8])], out: &mut Vec<u8>) {
    let mut nameoff = entries.len() * DIRENT_SIZE;
    for (nid, ft, name) in entries {
        out.extend_from_slice(&nid.to_le_bytes());
        out.extend_from_slice(&(nameoff as u16).to_le_bytes());
        out.push(*ft);
        out.push(0);
        nameoff += name.len();
    }
    for (_, _, name) in entries {
        out.extend_from_slice(name);
    }
}
