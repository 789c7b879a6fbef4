//! File contents for the corpus: text that compresses like source code, binaries that
//! compress like shared objects, and random bytes that do not compress at all.
//!
//! Why not zeros or one repeated sentence: decoders and writers behave very differently on
//! data that compresses 1000× (the decoder is idle, everything is memcpy) and on real
//! builds, which gzip about 3×. The mix below is tuned so the build tree gzips to roughly
//! a third of its size, like the 80 MB → 251 MB app build of issue 6. Everything is drawn
//! from one seeded generator, so the same seed gives byte-identical files.

use rand::rngs::StdRng;
use rand::{Rng, RngCore};

/// Zipf exponent of identifier frequency; ~1 is what word counts in code show.
const ZIPF_S: f64 = 1.2;

/// Identifiers that dominate real Python/JS code; they get the top Zipf ranks.
const COMMON: &[&str] = &[
    "self", "return", "None", "data", "value", "request", "response", "config", "user", "id",
    "name", "get", "set", "list", "dict", "path", "url", "key", "items", "result", "error", "test",
    "init", "model", "view", "query", "session", "args", "kwargs", "context", "node", "index",
    "count", "obj", "cls", "type", "field", "options", "params", "logger", "cache",
];

const SYLLABLES: &[&str] = &[
    "ba", "co", "de", "fi", "ga", "he", "in", "jo", "ka", "lu", "me", "no", "op", "pa", "qu", "re",
    "si", "ta", "un", "ve", "wa", "xe", "yo", "za", "str", "pro", "man", "ger", "ser", "tion",
    "ent", "ize", "able", "form", "load", "hand", "ler", "back", "end", "mat",
];

/// A vocabulary with Zipf-distributed word frequencies.
pub struct Vocab {
    words: Vec<String>,
    cdf: Vec<f64>,
}

impl Vocab {
    pub fn new(rng: &mut StdRng, size: usize) -> Self {
        let mut words: Vec<String> = COMMON.iter().map(|s| s.to_string()).collect();
        let mut seen: std::collections::HashSet<String> = words.iter().cloned().collect();
        while words.len() < size {
            let n = rng.random_range(1..=4);
            let w: String = (0..n)
                .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
                .collect();
            if seen.insert(w.clone()) {
                words.push(w);
            }
        }
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(words.len());
        for r in 0..words.len() {
            acc += 1.0 / ((r + 1) as f64).powf(ZIPF_S);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Self { words, cdf }
    }

    pub fn word(&self, rng: &mut StdRng) -> &str {
        let u: f64 = rng.random();
        let i = self
            .cdf
            .partition_point(|&c| c < u)
            .min(self.words.len() - 1);
        &self.words[i]
    }

    /// A word from the rarer half: used for file and package names.
    pub fn rare(&self, rng: &mut StdRng) -> &str {
        let lo = self.words.len() / 8;
        &self.words[rng.random_range(lo..self.words.len())]
    }
}

/// Share of words drawn from a file's own small vocabulary: a module keeps using its own
/// names, which is much of why real source compresses ~4×.
const LOCAL_SHARE: f64 = 0.7;

/// Words of one file: its local names plus the global Zipf vocabulary.
pub struct Words<'a> {
    global: &'a Vocab,
    local: Vec<&'a str>,
}

impl<'a> Words<'a> {
    fn new(rng: &mut StdRng, global: &'a Vocab) -> Self {
        let n = rng.random_range(10..30);
        let local = (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    global.rare(rng)
                } else {
                    global.word(rng)
                }
            })
            .collect();
        Self { global, local }
    }

    fn word(&self, rng: &mut StdRng) -> &'a str {
        if rng.random_bool(LOCAL_SHARE) {
            self.local[rng.random_range(0..self.local.len())]
        } else {
            self.global.word(rng)
        }
    }
}

/// Kinds of text file, each with its own line shapes.
#[derive(Clone, Copy, Debug)]
pub enum TextKind {
    Python,
    Js,
    Json,
    Css,
    Html,
    Prose,
}

impl TextKind {
    pub fn ext(self) -> &'static str {
        match self {
            TextKind::Python => "py",
            TextKind::Js => "js",
            TextKind::Json => "json",
            TextKind::Css => "css",
            TextKind::Html => "html",
            TextKind::Prose => "md",
        }
    }
}

/// Text of about `len` bytes (exactly `len`, cut at the end).
pub fn text(rng: &mut StdRng, v: &Vocab, kind: TextKind, len: usize) -> Vec<u8> {
    let mut out = String::with_capacity(len + 256);
    let mut indent = 0usize;
    let v = &Words::new(rng, v);
    while out.len() < len {
        match kind {
            TextKind::Python => python_line(rng, v, &mut indent, &mut out),
            TextKind::Js => js_line(rng, v, &mut indent, &mut out),
            TextKind::Json => json_line(rng, v, &mut out),
            TextKind::Css => css_rule(rng, v, &mut out),
            TextKind::Html => html_line(rng, v, &mut out),
            TextKind::Prose => prose_line(rng, v, &mut out),
        }
    }
    let mut b = out.into_bytes();
    b.truncate(len);
    b
}

fn num(rng: &mut StdRng) -> u64 {
    if rng.random_bool(0.95) {
        rng.random_range(0..64)
    } else {
        rng.random_range(0..1_000_000)
    }
}

fn sentence(rng: &mut StdRng, v: &Words, out: &mut String) {
    let n = rng.random_range(4..14);
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(v.word(rng));
    }
    out.push('.');
}

fn python_line(rng: &mut StdRng, v: &Words, indent: &mut usize, out: &mut String) {
    let pad = "    ".repeat(*indent);
    let r = rng.random_range(0..100);
    let (a, b, c) = (v.word(rng), v.word(rng), v.word(rng));
    match r {
        0..=5 => {
            out.push_str(&format!("import {a}.{b}\n"));
            *indent = 0;
        }
        6..=9 => {
            out.push_str(&format!("from {a} import {b}, {c}\n"));
            *indent = 0;
        }
        10..=13 => {
            let cap = |s: &str| {
                let mut c = s.chars();
                c.next()
                    .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                    .unwrap_or_default()
            };
            out.push_str(&format!("\n\nclass {}{}({}):\n", cap(a), cap(b), cap(c)));
            *indent = 1;
        }
        14..=22 => {
            let d = num(rng);
            out.push_str(&format!(
                "\n{pad}def {a}_{b}(self, {c}, {}={d}):\n",
                v.word(rng)
            ));
            *indent = (*indent).min(1) + 1;
        }
        23..=27 => {
            out.push_str(&format!("{pad}\"\"\""));
            sentence(rng, v, out);
            out.push_str("\"\"\"\n");
        }
        28..=33 => {
            out.push_str(&format!("{pad}# "));
            sentence(rng, v, out);
            out.push('\n');
        }
        34..=43 => {
            out.push_str(&format!(
                "{pad}if {a} is not None and {b}.{c} > {}:\n",
                num(rng)
            ));
            *indent = (*indent + 1).min(4);
        }
        44..=50 => {
            out.push_str(&format!("{pad}return {a}[{}:]\n", num(rng)));
            *indent = indent.saturating_sub(1).max(1);
        }
        51..=58 => out.push_str(&format!("{pad}{a} = {b}.get(\"{c}\", {})\n", v.word(rng))),
        59..=64 => out.push_str(&format!(
            "{pad}for {a} in {b}.{c}():\n{pad}    {}.append({a})\n",
            v.word(rng)
        )),
        65..=70 => out.push_str(&format!(
            "{pad}raise {a}Error(\"{b} {c} %s\" % {})\n",
            v.word(rng)
        )),
        _ => out.push_str(&format!(
            "{pad}{a} = self.{b}({c}, {}={})\n",
            v.word(rng),
            num(rng)
        )),
    }
}

fn js_line(rng: &mut StdRng, v: &Words, indent: &mut usize, out: &mut String) {
    let pad = "  ".repeat(*indent);
    let (a, b, c) = (v.word(rng), v.word(rng), v.word(rng));
    match rng.random_range(0..100) {
        0..=9 => {
            out.push_str(&format!("{pad}function {a}{b}({c}, {}) {{\n", v.word(rng)));
            *indent = (*indent + 1).min(4);
        }
        10..=19 => {
            out.push_str(&format!("{pad}}}\n"));
            *indent = indent.saturating_sub(1);
        }
        20..=29 => out.push_str(&format!("{pad}var {a} = require('{b}/{c}');\n")),
        30..=39 => out.push_str(&format!("{pad}// {a} {b} {c}\n")),
        40..=54 => out.push_str(&format!(
            "{pad}if ({a}.{b} === {}) {{ return {c}; }}\n",
            num(rng)
        )),
        _ => out.push_str(&format!(
            "{pad}{a}.{b} = {c}.{}({}, '{}');\n",
            v.word(rng),
            num(rng),
            v.word(rng)
        )),
    }
}

fn json_line(rng: &mut StdRng, v: &Words, out: &mut String) {
    out.push_str(&format!(
        "  \"{}\": {{\"{}\": \"{}\", \"version\": \"{}.{}.{}\", \"size\": {}}},\n",
        v.word(rng),
        v.word(rng),
        v.word(rng),
        rng.random_range(0..5),
        rng.random_range(0..20),
        rng.random_range(0..50),
        num(rng)
    ));
}

fn css_rule(rng: &mut StdRng, v: &Words, out: &mut String) {
    out.push_str(&format!(
        ".{}-{} {{\n  margin: {}px {}px;\n  color: #{:06x};\n}}\n",
        v.word(rng),
        v.word(rng),
        rng.random_range(0..32),
        rng.random_range(0..32),
        rng.random_range(0..0x1000000u32)
    ));
}

fn html_line(rng: &mut StdRng, v: &Words, out: &mut String) {
    out.push_str(&format!(
        "<div class=\"{}\"><a href=\"/{}/{}\">",
        v.word(rng),
        v.word(rng),
        v.word(rng)
    ));
    sentence(rng, v, out);
    out.push_str("</a></div>\n");
}

fn prose_line(rng: &mut StdRng, v: &Words, out: &mut String) {
    for _ in 0..rng.random_range(1..5) {
        sentence(rng, v, out);
        out.push(' ');
    }
    out.push_str("\n\n");
}

/// Byte alphabet of machine code: a few opcodes and small operands dominate.
const CODE_BYTES: &[u8] = &[
    0x00, 0x00, 0x00, 0x48, 0x48, 0x89, 0x89, 0x8b, 0x8b, 0xe8, 0xff, 0x0f, 0x85, 0x84, 0xc3, 0x41,
    0x4c, 0x24, 0x45, 0x31, 0xc0, 0x83, 0xec, 0x08, 0x10, 0x18, 0x20, 0x74, 0x75, 0xeb, 0x01, 0x02,
];

/// A binary of `len` bytes shaped like a shared object: code, zero padding, string tables,
/// repeated structures and relocation-like random data. Compresses about 3× with gzip.
pub fn binary(rng: &mut StdRng, v: &Vocab, len: usize) -> Vec<u8> {
    const CHUNK: usize = 4096;
    let mut out = Vec::with_capacity(len + CHUNK);
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    while out.len() < len {
        let r = rng.random_range(0..100);
        match r {
            0..=19 => {
                for _ in 0..CHUNK {
                    let b = if rng.random_bool(0.95) {
                        CODE_BYTES[rng.random_range(0..CODE_BYTES.len())]
                    } else {
                        rng.random()
                    };
                    out.push(b);
                }
            }
            20..=49 => out.resize(out.len() + CHUNK, 0),
            50..=69 => {
                let mut s = String::new();
                while s.len() < CHUNK {
                    s.push_str(v.word(rng));
                    s.push('_');
                    s.push_str(v.word(rng));
                    s.push('\0');
                }
                out.extend_from_slice(&s.as_bytes()[..CHUNK]);
            }
            70..=91 if out.len() > 2 * CHUNK => {
                let back = rng.random_range(CHUNK..out.len().min(64 * CHUNK));
                let start = out.len() - back;
                for i in 0..CHUNK {
                    let b = out[start + i % back];
                    out.push(if rng.random_bool(0.005) {
                        rng.random()
                    } else {
                        b
                    });
                }
            }
            _ => {
                let at = out.len();
                out.resize(at + CHUNK, 0);
                rng.fill_bytes(&mut out[at..]);
            }
        }
    }
    out.truncate(len);
    out
}

/// `len` incompressible bytes (already-compressed assets: images, fonts, .gz).
pub fn random(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    rng.fill_bytes(&mut b);
    b
}

/// A log-normal size around `median` (spread `sigma`), clamped to [lo, hi].
pub fn lognormal(rng: &mut StdRng, median: f64, sigma: f64, lo: f64, hi: f64) -> f64 {
    // Box–Muller; rand_distr is not a dependency and one normal draw is all we need.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (median * (sigma * z).exp()).clamp(lo, hi)
}

/// Log-uniform size in [lo, hi].
pub fn loguniform(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    (lo.ln() + rng.random::<f64>() * (hi.ln() - lo.ln())).exp()
}
