//! Sparse files: the map of data segments, in each of its four encodings, and the rule
//! that decides whether GNU tar and other readers would agree on the file it describes.
//!
//! Encodings: old GNU (`S` entries: four slots in the header, 21 per extension block),
//! PAX 0.0 (`GNU.sparse.offset`/`numbytes` record pairs), PAX 0.1 (`GNU.sparse.map`) and
//! PAX 1.0 (the map as decimal lines at the start of the entry's data). In all of them
//! the segments' data follows as one stream, in map order.
//!
//! GNU tar writes each segment at its offset and leaves the rest a hole; a zero-length
//! segment truncates the file at its offset (that is how a trailing hole gets its size);
//! and it reads every segment's data from a block boundary (`sparse_extract_region`),
//! while `tar -t` and every other reader take the data as one contiguous stream. A map is
//! therefore accepted only when all of these readings give the same file
//! ([`validate`]): segments in order without overlap, inside the file, every data segment
//! but the last a whole number of blocks, the data adding up to exactly what the entry
//! stores, and the last segment ending at the file's size (GNU tar would otherwise
//! leave the file shorter than it lists it).

use super::header::{self, BLOCK};

/// One run of data at `offset`; everything between runs is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
}

/// Read one old-GNU slot (offset, numbytes; 12 bytes each). `None` = the empty slot that
/// ends the map (GNU tar looks only at the first byte of `numbytes`).
pub fn gnu_slot(slot: &[u8]) -> Result<Option<Segment>, String> {
    if slot[12] == 0 {
        return Ok(None);
    }
    let num = |f: &[u8], what: &str| {
        header::parse(f, false)
            .map_err(|e| format!("bad sparse {what} field: {e}"))
            .and_then(|v| {
                u64::try_from(v)
                    .ok()
                    .filter(|&v| v <= i64::MAX as u64)
                    .ok_or_else(|| format!("sparse {what} {v} is out of range"))
            })
    };
    Ok(Some(Segment {
        offset: num(&slot[..12], "offset")?,
        len: num(&slot[12..24], "numbytes")?,
    }))
}

/// The PAX 1.0 map: decimal lines at the start of the data — a count, then that many
/// offset and size pairs. Fed block by block; GNU tar's `pax_decode_header` rules: digits
/// only, each line at most 19 digits and its newline.
#[derive(Debug, Default)]
pub struct MapLines {
    line: Vec<u8>,
    count: Option<u64>,
    pending: Option<u64>,
    pub segments: Vec<Segment>,
}

impl MapLines {
    /// Take the next block; `Ok(true)` when the map is complete (the rest of this block
    /// is padding).
    pub fn feed(&mut self, block: &[u8]) -> Result<bool, String> {
        for &c in block {
            if c != b'\n' {
                if self.line.len() == 19 {
                    return Err("sparse map line longer than 19 digits".into());
                }
                self.line.push(c);
                continue;
            }
            let line = std::mem::take(&mut self.line);
            if line.is_empty() || !line.iter().all(u8::is_ascii_digit) {
                return Err(format!(
                    "malformed sparse map line `{}`",
                    String::from_utf8_lossy(&line)
                ));
            }
            let n: u64 = std::str::from_utf8(&line)
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| "sparse map number out of range".to_string())?;
            match (self.count, self.pending.take()) {
                (None, _) => self.count = Some(n),
                (Some(_), None) => self.pending = Some(n),
                (Some(_), Some(offset)) => self.segments.push(Segment { offset, len: n }),
            }
            if self.count == Some(self.segments.len() as u64) && self.pending.is_none() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The PAX 0.0/0.1 records, applied in order as GNU tar applies them.
#[derive(Debug, Default)]
pub struct PaxMap {
    /// `GNU.sparse.numblocks`: how many segments the records may hold.
    pub capacity: Option<u64>,
    pub segments: Vec<Segment>,
    offset: Option<u64>,
}

impl PaxMap {
    pub fn numblocks(&mut self, n: u64) {
        self.capacity = Some(n);
        self.segments.clear();
        self.offset = None;
    }

    fn room(&self, key: &str) -> Result<(), String> {
        if (self.segments.len() as u64) < self.capacity.unwrap_or(0) {
            Ok(())
        } else {
            Err(format!(
                "PAX {key} beyond GNU.sparse.numblocks={}",
                self.capacity.unwrap_or(0)
            ))
        }
    }

    /// `GNU.sparse.offset` (0.0).
    pub fn offset(&mut self, v: u64) -> Result<(), String> {
        self.room("GNU.sparse.offset")?;
        if self.offset.replace(v).is_some() {
            return Err("two GNU.sparse.offset records without a GNU.sparse.numbytes".into());
        }
        Ok(())
    }

    /// `GNU.sparse.numbytes` (0.0).
    pub fn numbytes(&mut self, len: u64) -> Result<(), String> {
        self.room("GNU.sparse.numbytes")?;
        let Some(offset) = self.offset.take() else {
            return Err("GNU.sparse.numbytes without a GNU.sparse.offset".into());
        };
        self.segments.push(Segment { offset, len });
        Ok(())
    }

    /// `GNU.sparse.map` (0.1): `offset,size,offset,size…`.
    pub fn map(&mut self, v: &[u8]) -> Result<(), String> {
        self.segments.clear();
        self.offset = None;
        let bad = || {
            format!(
                "invalid PAX GNU.sparse.map={}",
                String::from_utf8_lossy(&v[..v.len().min(60)])
            )
        };
        let mut nums = Vec::new();
        for part in v.split(|&b| b == b',') {
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(bad());
            }
            let n: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(bad)?;
            nums.push(n);
        }
        if nums.len() % 2 != 0 {
            return Err("PAX GNU.sparse.map has an odd number of values".into());
        }
        for pair in nums.chunks(2) {
            self.room("GNU.sparse.map")?;
            self.segments.push(Segment {
                offset: pair[0],
                len: pair[1],
            });
        }
        Ok(())
    }

    pub fn finish(&self) -> Result<(), String> {
        if self.offset.is_some() {
            return Err("GNU.sparse.offset without a GNU.sparse.numbytes".into());
        }
        Ok(())
    }
}

/// Accept a map only where GNU tar (`-x` and `-t`) and contiguous readers agree (see the
/// module note). `stored` is the entry's data after any in-data map.
pub fn validate(segments: &[Segment], real_size: u64, stored: u64) -> Result<(), String> {
    let mut end = 0u64;
    let mut total = 0u64;
    let last_data = segments.iter().rposition(|s| s.len > 0);
    for (i, s) in segments.iter().enumerate() {
        let Some(seg_end) = s
            .offset
            .checked_add(s.len)
            .filter(|&e| e <= i64::MAX as u64)
        else {
            return Err(format!("sparse segment at {} overflows", s.offset));
        };
        if seg_end > real_size {
            return Err(format!(
                "sparse segment {}+{} ends past the file's size {real_size}",
                s.offset, s.len
            ));
        }
        if s.offset < end {
            return Err(format!(
                "sparse segments overlap or are out of order (segment at {} before byte {end})",
                s.offset
            ));
        }
        if s.len % BLOCK as u64 != 0 && Some(i) != last_data {
            return Err(format!(
                "sparse segment {}+{} is not a whole number of 512-byte blocks and is not \
                 the last one (GNU tar reads each segment from a block boundary, other \
                 readers do not)",
                s.offset, s.len
            ));
        }
        end = seg_end;
        total += s.len;
    }
    if total != stored {
        return Err(format!(
            "sparse map describes {total} bytes of data but the entry stores {stored}"
        ));
    }
    if end != real_size {
        return Err(format!(
            "sparse map ends at byte {end}, before the file's size {real_size} (GNU tar \
             would extract a shorter file than it lists)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset: u64, len: u64) -> Segment {
        Segment { offset, len }
    }

    #[test]
    fn map_lines_across_blocks() {
        let mut m = MapLines::default();
        let text = b"3\n0\n512\n4096\n10\n";
        let mut block = vec![0u8; 512];
        block[..text.len()].copy_from_slice(text);
        assert!(!m.feed(&block[..10]).unwrap());
        assert!(!m.feed(&block[10..text.len()]).unwrap());
        let rest = b"9000\n0\n";
        assert!(m.feed(rest).unwrap());
        assert_eq!(m.segments, vec![seg(0, 512), seg(4096, 10), seg(9000, 0)]);
        let mut bad = MapLines::default();
        assert!(bad.feed(b"1\n+5\n").is_err());
        assert!(MapLines::default().feed(b"12345678901234567890\n").is_err());
    }

    #[test]
    fn validation_rules() {
        assert!(validate(&[seg(0, 512), seg(1024, 3), seg(2000, 0)], 2000, 515).is_ok());
        assert!(validate(&[seg(60 << 30, 0)], 60 << 30, 0).is_ok());
        assert!(validate(&[], 0, 0).is_ok());
        assert!(validate(&[seg(0, 10), seg(1024, 3)], 1027, 13)
            .unwrap_err()
            .contains("block"));
        assert!(validate(&[seg(1024, 512), seg(0, 512)], 1536, 1024)
            .unwrap_err()
            .contains("order"));
        assert!(validate(&[seg(0, 512)], 1000, 512)
            .unwrap_err()
            .contains("shorter"));
        assert!(validate(&[seg(0, 512)], 512, 1024)
            .unwrap_err()
            .contains("stores"));
        assert!(validate(&[seg(0, 1024)], 512, 1024)
            .unwrap_err()
            .contains("past"));
    }
}
