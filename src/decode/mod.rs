//! Decompression: which format a download is, and a `Read` that undoes it.
//!
//! The URL's extension is only a hint; the bytes decide. [`detect`] looks at the magic
//! numbers of the four compressors we accept and, for an uncompressed archive, at the tar
//! header itself (`ustar` at offset 257, or an old-GNU/v7 header whose checksum adds up).
//!
//! [`decoder`] returns a plain synchronous `Read`. It runs on the extraction thread, pulled by
//! the tar parser, because everything after the hasher is one blocking pipeline (see
//! `extract`): decompression is the CPU-heavy stage, and letting the parser pull from it
//! means no extra copy and no extra hop.
//!
//! Why not simply the crates' `Multi*Decoder`s: we want the same three guarantees from every
//! format, and the crates disagree on them.
//!
//! - **Concatenated members are decoded** (`gzip` members, `bzip2` streams as written by
//!   pbzip2/lbzip2, `xz` streams, `zstd` frames as written by `zstd -T`).
//! - **A truncated stream is an error**, never a silent short read; the tar layer would
//!   otherwise see a clean end-of-file at a member boundary.
//! - **Trailing garbage is an error**: after the last member only end-of-file or zero padding
//!   (tape-block padding, xz stream padding) may follow. Anything else means the file is not
//!   what it claims to be, and we refuse it rather than guess.
//!
//! So we drive each crate's single-member `bufread` decoder ourselves over one shared input
//! buffer ([`Input`]), and at each member boundary look at what follows.
//!
//! xz: liblzma's multithreaded decoder can decode the independent blocks of a multi-block
//! file (`xz -T0`, pixz) on several cores, but we measured it and default to one thread:
//! on the 248 MB build corpus (`xz -6 -T2`, 24 MiB blocks) two threads peaked at 155 MB
//! RSS (target: 64 MiB for all of `vrun setup`), and capped to [`XZ_MEMLIMIT_THREADING`]
//! it ran slower than the plain decoder (2.41 s vs 2.03 s, `cargo bench --bench decode`).
//! Operators with memory to spare opt in with `VRUN_XZ_THREADS=2` ([`XZ_THREADS_ENV`]):
//! measured on a quiet machine, decode alone 1.47 s vs 2.63 s for one thread (`xz -dc -T1`
//! 3.44 s), and a cold `vrun setup` of the 262 MB xz bench build on tmpfs 2.42 s vs 3.77 s
//! (`curl | tar xJ`: 5.4 s) at 130 MB peak RSS instead of 28 MB.
//!
//! gzip: flate2 must be built with `runtime_detection` (see Cargo.toml): without it zlib-rs
//! has no CPU detection, so no AVX2 inflate and no PCLMULQDQ crc32 (0.56 s vs 0.38 s).
//!
//! bzip2: files made of many streams (pbzip2) are decoded on all cores by [`bzip2_par`],
//! which hands the work back to the sequential decoder here whenever it is unsure, so the
//! three guarantees above and the error messages stay this module's. On the 262 MB build
//! corpus (`pbzip2 -9`, 303 streams) 2 workers decode in 7.8 s against 12.7 s for one
//! (`pbzip2 -dc -p2`: 6.1 s; `VRUN_BENCH_BZ2=… cargo bench --bench decode`).

pub mod bzip2_par;

use std::fmt;
use std::io::{self, BufRead, Read};

/// Bytes of a download [`detect`] wants to see: a whole tar header block.
pub const HEAD_LEN: usize = 512;

/// Input buffer of the decoders. Large enough that a decoder call does real work (syscall
/// and FFI overhead vanish), small enough to stay in L2.
const INPUT_BUFFER: usize = 128 * 1024;

/// Memory liblzma may use for threaded xz decoding (only when an operator asked for more
/// than one thread with [`XZ_THREADS_ENV`]); above it, it decodes with fewer threads. A
/// 32 MiB cap (one 24 MiB block) made two threads slower than one; 256 MiB lets two
/// threads work on `xz -T`'s default blocks.
pub const XZ_MEMLIMIT_THREADING: u64 = 256 * 1024 * 1024;

/// Memory a decoder may use by default (xz dictionary, zstd window). All of `vrun setup`
/// must fit in 64 MiB RSS and the rest of it (pipe, writer budget, buffers) takes about
/// 30 MiB, so a decoder gets 32 MiB: every xz preset up to `-8` (32 MiB dictionary) and
/// every zstd level up to 19 (8 MiB window), and `zstd --long=25`. Without a cap a 150 KB
/// xz download asking for a 512 MiB dictionary took 393 MB of RSS. Raise it with
/// [`DECODE_MEMORY_ENV`] for `xz -9` (64 MiB dictionary) or `zstd --long=27`.
pub const DEFAULT_DECODE_MEMORY: u64 = 32 * 1024 * 1024;

/// `VRUN_DECODE_MEMORY=64M` (bytes; `K`, `M`, `G` suffixes are binary) sets the decoder
/// memory cap.
pub const DECODE_MEMORY_ENV: &str = "VRUN_DECODE_MEMORY";

/// The decoder memory cap: [`DECODE_MEMORY_ENV`] when set and valid, else the default.
/// (An invalid value is refused by setup before any I/O: [`decode_memory_from_env`].)
pub fn decode_memory() -> u64 {
    decode_memory_from_env()
        .ok()
        .flatten()
        .unwrap_or(DEFAULT_DECODE_MEMORY)
}

/// [`DECODE_MEMORY_ENV`] parsed: `Ok(None)` when unset.
pub fn decode_memory_from_env() -> Result<Option<u64>, String> {
    let Ok(v) = std::env::var(DECODE_MEMORY_ENV) else {
        return Ok(None);
    };
    let t = v.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let mult = match t[i..].trim().to_ascii_uppercase().as_str() {
                "K" | "KB" | "KIB" => 1 << 10,
                "M" | "MB" | "MIB" => 1 << 20,
                "G" | "GB" | "GIB" => 1 << 30,
                _ => 0,
            };
            (&t[..i], mult)
        }
    };
    match num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)) {
        Some(n) if n >= 1 << 20 => Ok(Some(n)),
        _ => Err(format!(
            "environment variable {DECODE_MEMORY_ENV}={v:?}: not a size of at least 1M (e.g. 64M)"
        )),
    }
}

/// Compression of a download, decided by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Gzip,
    Bzip2,
    Xz,
    Zstd,
    /// An uncompressed tar archive.
    Tar,
}

impl Format {
    /// Short lowercase name, as in error messages and `--timings`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Gzip => "gzip",
            Format::Bzip2 => "bzip2",
            Format::Xz => "xz",
            Format::Zstd => "zstd",
            Format::Tar => "tar",
        }
    }

    /// Whether `bytes` starts a member of this (compressed) format.
    fn member_magic(self, bytes: &[u8]) -> bool {
        match self {
            Format::Gzip => bytes.starts_with(GZIP_MAGIC),
            Format::Bzip2 => {
                bytes.starts_with(BZIP2_MAGIC)
                    && bytes.len() >= 4
                    && (b'1'..=b'9').contains(&bytes[3])
            }
            Format::Xz => bytes.starts_with(XZ_MAGIC),
            Format::Zstd => bytes.starts_with(ZSTD_MAGIC) || is_zstd_skippable(bytes),
            Format::Tar => false,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const BZIP2_MAGIC: &[u8] = b"BZh";
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// The longest magic above; what we need to see at a member boundary.
const MAGIC_LEN: usize = 6;

fn is_zstd_skippable(b: &[u8]) -> bool {
    b.len() >= 4 && b[0] & 0xf0 == 0x50 && b[1..4] == [0x2a, 0x4d, 0x18]
}

/// Decide the format from the first bytes of a download (give it [`HEAD_LEN`] bytes, or
/// all of them if the download is shorter). `None` means "not something we can unpack".
pub fn detect(head: &[u8]) -> Option<Format> {
    if head.starts_with(GZIP_MAGIC) {
        Some(Format::Gzip)
    } else if Format::Bzip2.member_magic(head) {
        Some(Format::Bzip2)
    } else if head.starts_with(XZ_MAGIC) {
        Some(Format::Xz)
    } else if Format::Zstd.member_magic(head) {
        Some(Format::Zstd)
    } else if is_tar_header(head) {
        Some(Format::Tar)
    } else {
        None
    }
}

/// A tar archive starts with a header block: POSIX/GNU ones say `ustar` at 257; old GNU and
/// v7 ones say nothing, so we accept a block whose checksum field matches its contents.
/// An empty archive (a zero block) is a tar too.
fn is_tar_header(head: &[u8]) -> bool {
    if head.len() < HEAD_LEN {
        return false;
    }
    let block = &head[..HEAD_LEN];
    if &block[257..262] == b"ustar" {
        return true;
    }
    if block.iter().all(|&b| b == 0) {
        return true;
    }
    let Some(stored) = parse_octal(&block[148..156]) else {
        return false;
    };
    let sum: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    stored == sum
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ');
    let mut value: u64 = 0;
    let mut digits = 0;
    for b in text {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        value = value.checked_mul(8)? + (b - b'0') as u64;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

/// The first bytes of a download, for an error message: hex and printable ASCII of at most
/// 16 bytes, e.g. `3c 21 44 4f 43 54 59 50 "<!DOCTYP"`.
pub fn describe_head(head: &[u8]) -> String {
    let shown = &head[..head.len().min(16)];
    if shown.is_empty() {
        return "an empty body".to_string();
    }
    let hex: Vec<String> = shown.iter().map(|b| format!("{b:02x}")).collect();
    let text: String = shown
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    format!("{} {:?}", hex.join(" "), text)
}

/// What went wrong in a compressed stream. Carried inside `io::Error` (kind `InvalidData`
/// or `UnexpectedEof`) so it passes through the tar parser; `Display` is the full message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a gzip, bzip2, xz, zstd or tar archive (first bytes: {head})")]
    UnknownFormat { head: String },
    #[error("{format} stream is truncated (ends inside member {member})")]
    Truncated { format: Format, member: u64 },
    #[error("{format} stream has trailing garbage at compressed byte {offset}: {head}")]
    TrailingGarbage {
        format: Format,
        offset: u64,
        head: String,
    },
    #[error(
        "{format} stream needs more memory than the decoder limit of {} MiB (its dictionary or window is that large); set {DECODE_MEMORY_ENV} higher to accept it",
        limit >> 20
    )]
    MemoryLimit { format: Format, limit: u64 },
    #[error("{format} stream is corrupt in member {member} (at compressed byte {offset})")]
    Corrupt {
        format: Format,
        member: u64,
        offset: u64,
        source: io::Error,
    },
}

impl From<DecodeError> for io::Error {
    fn from(e: DecodeError) -> io::Error {
        let kind = match e {
            DecodeError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// Read the first [`HEAD_LEN`] bytes of `r` (fewer at end-of-file), detect the format and
/// return a decoder over the whole stream, the head included.
pub fn open<'a>(
    r: impl Read + Send + 'a,
) -> Result<(Format, Box<dyn Read + Send + 'a>), DecodeError> {
    open_with(r, DecodeOptions::default())
}

/// [`open`] with explicit options (e.g. another decoder memory cap).
pub fn open_with<'a>(
    mut r: impl Read + Send + 'a,
    options: DecodeOptions,
) -> Result<(Format, Box<dyn Read + Send + 'a>), DecodeError> {
    let mut head = Vec::with_capacity(HEAD_LEN);
    (&mut r)
        .take(HEAD_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|source| DecodeError::Corrupt {
            format: Format::Tar,
            member: 0,
            offset: 0,
            source,
        })?;
    let format = detect(&head).ok_or_else(|| DecodeError::UnknownFormat {
        head: describe_head(&head),
    })?;
    let whole = io::Cursor::new(head).chain(r);
    Ok((format, decoder_with(format, whole, options)))
}

/// A reader yielding the decompressed bytes of `r`, which must be in `format`.
/// Errors are `io::Error`s wrapping a [`DecodeError`].
pub fn decoder<'a>(format: Format, r: impl Read + Send + 'a) -> Box<dyn Read + Send + 'a> {
    decoder_with(format, r, DecodeOptions::default())
}

/// Tuning of the decoders (benches compare settings; callers use the default).
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Threads for xz decoding (only multi-block files can use more than one).
    /// Default 1: see the module note for the measurement.
    pub xz_threads: u32,
    /// Worker threads for bzip2 files made of many streams (pbzip2); 0 or 1 decodes on the
    /// caller's thread only. Default: the CPUs available, at most
    /// [`bzip2_par::MAX_WORKERS`]. See [`bzip2_par`].
    pub bzip2_workers: u32,
    /// Memory an xz or zstd decoder may use ([`DEFAULT_DECODE_MEMORY`]).
    pub memory_limit: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            xz_threads: xz_threads_from_env(),
            bzip2_workers: bzip2_par::default_workers(),
            memory_limit: decode_memory(),
        }
    }
}

/// Operators who can spare the memory opt in to threaded xz decoding with
/// `VRUN_XZ_THREADS=N` (see the module note); unset, empty or unparsable means 1.
pub const XZ_THREADS_ENV: &str = "VRUN_XZ_THREADS";

fn xz_threads_from_env() -> u32 {
    std::env::var(XZ_THREADS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(1, |n| n.clamp(1, 16))
}

/// [`decoder`] with explicit options.
pub fn decoder_with<'a>(
    format: Format,
    r: impl Read + Send + 'a,
    options: DecodeOptions,
) -> Box<dyn Read + Send + 'a> {
    match format {
        Format::Tar => Box::new(r),
        Format::Bzip2 if options.bzip2_workers > 1 => {
            Box::new(bzip2_par::ParallelBzip2::new(r, options))
        }
        _ => Box::new(Members::resume(format, options, r, 0, 0)),
    }
}

/// Input buffer shared by the members of a stream. Unlike `BufReader` it can be asked for
/// *at least* n bytes, which we need to read a magic number that straddles two reads.
struct Input<R> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// Bytes read from `inner` so far.
    read: u64,
}

impl<R: Read> Input<R> {
    /// Input whose first byte is at compressed offset `offset` (0 for a whole download).
    fn new(inner: R, offset: u64) -> Self {
        Input {
            inner,
            buf: vec![0; INPUT_BUFFER].into_boxed_slice(),
            pos: 0,
            end: 0,
            read: offset,
        }
    }

    /// Offset in the compressed stream of the next unconsumed byte.
    fn offset(&self) -> u64 {
        self.read - (self.end - self.pos) as u64
    }

    /// Buffer at least `n` bytes (fewer only at end-of-file) and return what is buffered.
    fn fill_at_least(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.end - self.pos < n {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
            while self.end < n {
                match self.inner.read(&mut self.buf[self.end..]) {
                    Ok(0) => break,
                    Ok(k) => {
                        self.end += k;
                        self.read += k as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(&self.buf[self.pos..self.end])
    }
}

impl<R: Read> Read for Input<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for Input<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.end {
            self.fill_at_least(1)
        } else {
            Ok(&self.buf[self.pos..self.end])
        }
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.end);
    }
}

/// A sequence of members of one format over one input.
struct Members<R: Read> {
    format: Format,
    options: DecodeOptions,
    /// 1-based number of the current (or last) member.
    member: u64,
    /// Compressed offset where the current member starts.
    member_start: u64,
    state: State<R>,
}

enum State<R: Read> {
    Gzip(flate2::bufread::GzDecoder<Input<R>>),
    Bzip2(bzip2::bufread::BzDecoder<Input<R>>),
    Xz(liblzma::bufread::XzDecoder<Input<R>>),
    Zstd(zstd::stream::read::Decoder<'static, Input<R>>),
    /// At a member boundary (or the start).
    Between(Input<R>),
    Done,
    /// Only while switching states, or after an error.
    Failed,
}

impl<R: Read> Members<R> {
    /// Decode `r`, which starts at compressed offset `offset`, right after `member` whole
    /// members (0 and 0 for a whole download), exactly as if those members had been
    /// decoded by this reader: the parallel bzip2 decoder hands over to it mid-file.
    fn resume(format: Format, options: DecodeOptions, r: R, member: u64, offset: u64) -> Self {
        Members {
            format,
            options,
            member,
            member_start: offset,
            state: State::Between(Input::new(r, offset)),
        }
    }

    fn input(&self) -> Option<&Input<R>> {
        match &self.state {
            State::Gzip(d) => Some(d.get_ref()),
            State::Bzip2(d) => Some(d.get_ref()),
            State::Xz(d) => Some(d.get_ref()),
            State::Zstd(d) => Some(d.get_ref()),
            State::Between(i) => Some(i),
            State::Done | State::Failed => None,
        }
    }

    /// Map a decoder error to one that names the format, member and offset.
    fn wrap(&self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return DecodeError::Truncated {
                format: self.format,
                member: self.member,
            }
            .into();
        }
        // Errors of the underlying reader (the network, the hasher) pass through as is.
        if e.get_ref().is_some_and(|inner| inner.is::<DecodeError>()) {
            return e;
        }
        let memlimit = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<liblzma::stream::Error>())
            .is_some_and(|x| matches!(x, liblzma::stream::Error::MemLimit))
            || (self.format == Format::Zstd && e.to_string().contains("too much memory"));
        if memlimit {
            return DecodeError::MemoryLimit {
                format: self.format,
                limit: self.options.memory_limit,
            }
            .into();
        }
        DecodeError::Corrupt {
            format: self.format,
            member: self.member,
            offset: self.error_offset(),
            source: e,
        }
        .into()
    }

    /// Where in the compressed stream an error was met. bzip2 tells how many bytes of the
    /// member it took in: at most 8 past the bad bit (libbz2-rs reads ahead that much when
    /// it can), so it hardly depends on how the input was buffered, and the parallel
    /// decoder, resuming this one mid-file, reports the same place. For the other formats
    /// it is the first byte not yet handed to the decoder (up to [`INPUT_BUFFER`] past).
    fn error_offset(&self) -> u64 {
        match &self.state {
            State::Bzip2(d) => self.member_start + d.total_in(),
            _ => self.input().map_or(0, Input::offset),
        }
    }

    /// At a boundary: start the next member, or finish at end-of-file (after zero padding),
    /// or fail on anything else.
    fn next_member(&mut self, mut input: Input<R>) -> io::Result<State<R>> {
        let mut padded = false;
        loop {
            let head = input.fill_at_least(MAGIC_LEN)?;
            if head.is_empty() {
                if self.member == 0 {
                    return Err(DecodeError::Truncated {
                        format: self.format,
                        member: 1,
                    }
                    .into());
                }
                return Ok(State::Done);
            }
            if self.member > 0 && head[0] == 0 {
                let zeros = head.iter().take_while(|&&b| b == 0).count();
                input.consume(zeros);
                padded = true;
                continue;
            }
            // Only xz defines padding *between* streams; elsewhere zeros end the file.
            if self.format.member_magic(head) && (!padded || self.format == Format::Xz) {
                break;
            }
            let head = describe_head(head);
            return Err(DecodeError::TrailingGarbage {
                format: self.format,
                offset: input.offset(),
                head,
            }
            .into());
        }
        self.member += 1;
        self.member_start = input.offset();
        Ok(match self.format {
            Format::Gzip => State::Gzip(flate2::bufread::GzDecoder::new(input)),
            Format::Bzip2 => State::Bzip2(bzip2::bufread::BzDecoder::new(input)),
            Format::Xz => State::Xz(liblzma::bufread::XzDecoder::new_stream(
                input,
                xz_stream(self.options.xz_threads, self.options.memory_limit)?,
            )),
            Format::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(input)?.single_frame();
                // The window is the decoder's memory: the largest power of two in the cap.
                let log = 63 - self.options.memory_limit.max(1 << 10).leading_zeros();
                d.window_log_max(log.clamp(10, 31))?;
                State::Zstd(d)
            }
            Format::Tar => unreachable!("tar is not decoded"),
        })
    }
}

/// One xz stream decoder: threaded when asked for more than one thread.
/// Threaded decoding is an opt-in to more memory (module note): up to
/// [`XZ_MEMLIMIT_THREADING`] for the threads, but one stream's dictionary is still capped.
fn xz_stream(threads: u32, memory_limit: u64) -> io::Result<liblzma::stream::Stream> {
    let stream = if threads > 1 {
        liblzma::stream::MtStreamBuilder::new()
            .threads(threads)
            .memlimit_threading(XZ_MEMLIMIT_THREADING.max(memory_limit))
            .memlimit_stop(XZ_MEMLIMIT_THREADING.max(memory_limit))
            .decoder()
    } else {
        liblzma::stream::Stream::new_stream_decoder(memory_limit, 0)
    };
    stream.map_err(|e| io::Error::other(format!("cannot start xz decoder: {e}")))
}

impl<R: Read> Members<R> {
    /// [`Read::read`], but a member's end is reported (`Ok(None)`) before the next one is
    /// looked at, so the caller can take the reader apart there ([`Members::into_boundary`]).
    fn read_member(&mut self, out: &mut [u8]) -> io::Result<Option<usize>> {
        self.read_until(out, true)
    }

    /// Between members: the compressed offset reached.
    fn boundary_offset(&self) -> Option<u64> {
        match &self.state {
            State::Between(input) => Some(input.offset()),
            _ => None,
        }
    }

    /// Between members: the input bytes buffered but not yet used, the input, the number of
    /// members decoded and the compressed offset reached. Anywhere else: `self` back.
    fn into_boundary(self: Box<Self>) -> Result<(Vec<u8>, R, u64, u64), Box<Self>> {
        match self.state {
            State::Between(input) => {
                let offset = input.offset();
                let held = input.buf[input.pos..input.end].to_vec();
                Ok((held, input.inner, self.member, offset))
            }
            _ => Err(self),
        }
    }

    fn read_until(
        &mut self,
        out: &mut [u8],
        stop_at_member_end: bool,
    ) -> io::Result<Option<usize>> {
        if out.is_empty() {
            return Ok(Some(0));
        }
        loop {
            let got = match &mut self.state {
                State::Gzip(d) => d.read(out),
                State::Bzip2(d) => d.read(out),
                State::Xz(d) => d.read(out),
                State::Zstd(d) => d.read(out),
                State::Between(_) => Ok(0),
                State::Done => return Ok(Some(0)),
                State::Failed => {
                    return Err(io::Error::other(format!(
                        "{} stream already failed",
                        self.format
                    )))
                }
            };
            match got {
                Ok(0) => {}
                Ok(n) => return Ok(Some(n)),
                Err(e) => {
                    let e = self.wrap(e);
                    self.state = State::Failed;
                    return Err(e);
                }
            }
            // The member ended (or we are between members): decide what comes next.
            let member_ended = !matches!(self.state, State::Between(_));
            let input = match std::mem::replace(&mut self.state, State::Failed) {
                State::Gzip(d) => d.into_inner(),
                State::Bzip2(d) => d.into_inner(),
                State::Xz(d) => d.into_inner(),
                State::Zstd(d) => d.finish(),
                State::Between(i) => i,
                State::Done | State::Failed => unreachable!("handled above"),
            };
            if stop_at_member_end && member_ended {
                self.state = State::Between(input);
                return Ok(None);
            }
            self.state = self.next_member(input).map_err(|e| self.wrap(e))?;
        }
    }
}

impl<R: Read> Read for Members<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        Ok(self.read_until(out, false)?.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_head_shows_hex_and_text() {
        assert_eq!(
            describe_head(b"<!DOCTYPE\n"),
            r#"3c 21 44 4f 43 54 59 50 45 0a "<!DOCTYPE.""#
        );
        assert_eq!(describe_head(b""), "an empty body");
    }

    #[test]
    fn detect_by_magic() {
        assert_eq!(detect(&[0x1f, 0x8b, 8, 0]), Some(Format::Gzip));
        assert_eq!(detect(b"BZh91AY&SY"), Some(Format::Bzip2));
        assert_eq!(detect(b"BZhx"), None);
        assert_eq!(detect(&[0xfd, b'7', b'z', b'X', b'Z', 0]), Some(Format::Xz));
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Some(Format::Zstd));
        assert_eq!(detect(b"<html>"), None);
        assert_eq!(detect(&[0u8; 512]), Some(Format::Tar));
        assert_eq!(detect(&[0u8; 100]), None);
    }

    #[test]
    fn detect_v7_tar_by_checksum() {
        let mut block = [0u8; 512];
        block[..5].copy_from_slice(b"hello");
        block[100..107].copy_from_slice(b"0000644");
        let sum: u32 = block.iter().map(|&b| b as u32).sum::<u32>() + 8 * 32;
        let field = format!("{sum:06o}\0 ");
        block[148..156].copy_from_slice(field.as_bytes());
        assert_eq!(detect(&block), Some(Format::Tar));
        block[0] = b'j';
        assert_eq!(detect(&block), None);
    }
}
