//! One 512-byte tar header block: its layout, its numbers, its checksum, its format.
//!
//! Every rule here is GNU tar 1.34's (`list.c`: `tar_checksum`, `from_header`,
//! `decode_header`, `read_header`), because what GNU tar extracts is the reference. Where
//! GNU tar only *warns* and carries on with a guess (obsolete base-64 numbers, two's
//! complement octal), the field is refused instead: a guess is where readers disagree.

/// Size of a tar block.
pub const BLOCK: usize = 512;

/// A header block.
pub type Block = [u8; BLOCK];

/// Field offsets of the ustar header (POSIX.1-1988) and the GNU/star variants.
pub mod at {
    use std::ops::Range;
    pub const NAME: Range<usize> = 0..100;
    pub const MODE: Range<usize> = 100..108;
    pub const UID: Range<usize> = 108..116;
    pub const GID: Range<usize> = 116..124;
    pub const SIZE: Range<usize> = 124..136;
    pub const MTIME: Range<usize> = 136..148;
    pub const CHKSUM: Range<usize> = 148..156;
    pub const TYPEFLAG: usize = 156;
    pub const LINKNAME: Range<usize> = 157..257;
    pub const MAGIC: Range<usize> = 257..263;
    pub const UNAME: Range<usize> = 265..297;
    pub const GNAME: Range<usize> = 297..329;
    pub const DEVMAJOR: Range<usize> = 329..337;
    pub const DEVMINOR: Range<usize> = 337..345;
    pub const PREFIX: Range<usize> = 345..500;
    /// Old GNU: four sparse slots (offset, numbytes: 12 bytes each) in the header.
    pub const GNU_SPARSE: usize = 386;
    pub const GNU_ISEXTENDED: usize = 482;
    pub const GNU_REALSIZE: Range<usize> = 483..495;
    /// Star: `prefix` is only 131 bytes, followed by atime and ctime.
    pub const STAR_PREFIX_END: usize = 345 + 130;
    pub const STAR_ATIME: Range<usize> = 476..488;
    pub const STAR_CTIME: Range<usize> = 488..500;
    /// A sparse extension block: 21 slots, then the continuation flag.
    pub const EXT_SLOTS: usize = 21;
    pub const EXT_ISEXTENDED: usize = 504;
}

/// Which dialect a header is written in, decided as GNU tar decides it (`decode_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// No ustar magic: the 1979 layout (name, mode, ids, size, mtime, link name only).
    V7,
    /// `ustar\0` magic without a PAX extended header.
    Ustar,
    /// `ustar\0` magic after a PAX extended header.
    Posix,
    /// `ustar\0` magic with star's atime/ctime in the prefix area.
    Star,
    /// `ustar  \0` magic (old GNU and GNU).
    Gnu,
}

impl Format {
    pub fn detect(b: &Block, has_pax: bool) -> Format {
        if &b[at::MAGIC] == b"ustar\0" {
            let star = b[at::STAR_PREFIX_END] == 0
                && is_octal(b[at::STAR_ATIME.start])
                && b[at::STAR_ATIME.end - 1] == b' '
                && is_octal(b[at::STAR_CTIME.start])
                && b[at::STAR_CTIME.end - 1] == b' ';
            if star {
                Format::Star
            } else if has_pax {
                Format::Posix
            } else {
                Format::Ustar
            }
        } else if &b[257..265] == b"ustar  \0" {
            Format::Gnu
        } else {
            Format::V7
        }
    }

    /// Whether the `prefix` field is part of the name (POSIX.1-1996 10.1.1).
    pub fn has_prefix(self) -> bool {
        matches!(self, Format::Ustar | Format::Posix | Format::Star)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::V7 => "v7",
            Format::Ustar => "ustar",
            Format::Posix => "posix",
            Format::Star => "star",
            Format::Gnu => "gnu",
        }
    }
}

fn is_octal(c: u8) -> bool {
    (b'0'..=b'7').contains(&c)
}

/// C `isspace` in the C locale.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The bytes of a NUL-terminated field (all of it if it has no NUL).
pub fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(i) => &field[..i],
        None => field,
    }
}

/// A header's name: `prefix/name` for the ustar family, `name` otherwise.
pub fn name(b: &Block, format: Format) -> Vec<u8> {
    let name = cstr(&b[at::NAME]);
    let prefix = cstr(&b[at::PREFIX]);
    if format.has_prefix() && !prefix.is_empty() {
        let mut v = Vec::with_capacity(prefix.len() + 1 + name.len());
        v.extend_from_slice(prefix);
        v.push(b'/');
        v.extend_from_slice(name);
        v
    } else {
        name.to_vec()
    }
}

/// The block is all zeros (an end-of-archive block).
pub fn is_zero(b: &Block) -> bool {
    b.iter().all(|&x| x == 0)
}

/// GNU tar accepts the POSIX (unsigned) sum and the old Sun/HP-UX signed sum.
pub fn checksum_ok(b: &Block) -> bool {
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &c) in b.iter().enumerate() {
        let c = if at::CHKSUM.contains(&i) { b' ' } else { c };
        unsigned += i64::from(c);
        signed += i64::from(c as i8);
    }
    match parse(&b[at::CHKSUM], true) {
        Ok(v) => v == i128::from(unsigned) || v == i128::from(signed),
        Err(_) => false,
    }
}

/// Why a numeric field was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumError {
    /// Only blanks (GNU tar: "Blanks in header where numeric value expected").
    Blank,
    /// GNU tar 1.13.6–1.13.11's base-64, which GNU tar still reads with a warning.
    Base64,
    /// Something else than octal digits, or base-256, followed by a space or NUL.
    Invalid,
    /// A base-256 number too big for 64 bits.
    Overflow,
}

impl std::fmt::Display for NumError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NumError::Blank => "only blanks where a number is expected",
            NumError::Base64 => "obsolete base-64 number",
            NumError::Invalid => "not a number",
            NumError::Overflow => "number too large",
        })
    }
}

/// A numeric header field, as GNU tar's `from_header` reads it: an optional leading NUL,
/// leading blanks, then octal digits ended by the field's end, a space or a NUL; or
/// GNU's base-256 (first byte 0x80 positive, 0xff negative, two's complement).
/// An all-NUL field is 0 (GNU tar's volume labels have one for size, mode and ids).
pub fn parse(field: &[u8], octal_only: bool) -> Result<i128, NumError> {
    let lim = field.len();
    let mut i = usize::from(field.first() == Some(&0));
    loop {
        if i == lim {
            return Err(NumError::Blank);
        }
        if !is_space(field[i]) {
            break;
        }
        i += 1;
    }
    let mut value: i128 = 0;
    let c = field[i];
    if is_octal(c) {
        while i < lim && is_octal(field[i]) {
            value = value * 8 + i128::from(field[i] - b'0');
            i += 1;
        }
    } else if octal_only {
        // Nothing: the check below accepts a NUL or a space here as 0, as GNU tar does.
    } else if c == b'-' || c == b'+' {
        return Err(NumError::Base64);
    } else if i + 2 <= lim && (c == 0x80 || c == 0xff) {
        // (c & 0x3f) minus the sign bit 0x40: 0x80 → 0, 0xff → -1, then the other bytes.
        value = i128::from(c & 0x3f) - i128::from(c & 0x40);
        i += 1;
        while i < lim {
            value = value * 256 + i128::from(field[i]);
            i += 1;
            if !(i128::from(i64::MIN)..=i128::from(u64::MAX)).contains(&value) {
                return Err(NumError::Overflow);
            }
        }
    }
    if i != lim && field[i] != 0 && !is_space(field[i]) {
        return Err(NumError::Invalid);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_as_gnu_tar_reads_them() {
        assert_eq!(parse(b"0000644\0", false), Ok(0o644));
        assert_eq!(parse(b"    644 ", false), Ok(0o644));
        assert_eq!(parse(b"\0\0\0\0\0\0\0\0", false), Ok(0));
        assert_eq!(parse(b"\0  12\0\0\0", false), Ok(0o12));
        assert_eq!(parse(b"        ", false), Err(NumError::Blank));
        assert_eq!(parse(b"0000644x", false), Err(NumError::Invalid));
        assert_eq!(parse(b"0000649 ", false), Err(NumError::Invalid));
        // Only the byte after the digits is looked at.
        assert_eq!(parse(b"0644 abc", false), Ok(0o644));
        assert_eq!(parse(b"+ab", false), Err(NumError::Base64));
        let mut pos = [0u8; 12];
        pos[0] = 0x80;
        pos[11] = 1;
        pos[10] = 1;
        assert_eq!(parse(&pos, false), Ok(257));
        // -1 and -86400 (1969-12-31) in base-256.
        assert_eq!(parse(&[0xff; 12], false), Ok(-1));
        let mut neg = [0xffu8; 12];
        let v = (-86400i64).to_be_bytes();
        neg[4..].copy_from_slice(&v);
        assert_eq!(parse(&neg, false), Ok(-86400));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[1] = 0xff;
        big[2] = 0xff;
        assert_eq!(parse(&big, false), Err(NumError::Overflow));
        // Checksum fields are octal only: base-256 there is not a number.
        assert_eq!(parse(&pos[..8], true), Err(NumError::Invalid));
    }

    #[test]
    fn signed_checksums_are_accepted() {
        let mut b = [0u8; BLOCK];
        b[..4].copy_from_slice(b"f\xe9\xff\x80");
        b[at::TYPEFLAG] = b'0';
        let unsigned: u32 = b.iter().map(|&c| u32::from(c)).sum::<u32>() + 8 * 32;
        let signed: i32 = b.iter().map(|&c| i32::from(c as i8)).sum::<i32>() + 8 * 32;
        b[at::CHKSUM].copy_from_slice(format!("{unsigned:06o}\0 ").as_bytes());
        assert!(checksum_ok(&b));
        b[at::CHKSUM].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
        assert!(checksum_ok(&b));
        b[at::CHKSUM].copy_from_slice(format!("{:06o}\0 ", signed + 1).as_bytes());
        assert!(!checksum_ok(&b));
    }
}
