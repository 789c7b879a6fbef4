//! Deterministic pseudo-random bytes (xorshift64): incompressible content of any size
//! from a seed, the same on every run, so a failure reproduces and no fixture file is
//! needed. Not for anything that must be unpredictable.

/// Marsaglia's xorshift64 (13, 7, 17).
pub struct XorShift(u64);

impl XorShift {
    /// A seed of 0 would stay 0 forever, so the low bit is always set.
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// `len` bytes of xorshift output from `seed` (little-endian words).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = XorShift::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&x.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}
