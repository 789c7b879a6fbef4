//! YAML as Velociraptor's Python side sees it: read proc.yaml, write settings.yaml.
//!
//! proc.yaml is written by Python (PyYAML) and `settings.yaml` is read by Python apps with
//! `yaml.safe_load`, so both directions follow **PyYAML's YAML 1.1 rules**, not YAML 1.2:
//!
//! * Reading: the maintained `yaml-rust2` parser gives us *events* (scalar text + style);
//!   we resolve plain scalars ourselves with PyYAML's implicit resolvers (`yes`/`on` are
//!   booleans, `0123` is octal, `1:20` is sexagesimal 80, `1_000` is 1000, `2001-12-14` is
//!   a date, `1e3` is a string because PyYAML's float needs a `.`). A hand-written
//!   `debug: yes` therefore means what it meant to the Python runner. Aliases and the
//!   `<<` merge key work as in `safe_load`; a later duplicate key wins, as in PyYAML.
//! * Writing: no maintained Rust emitter quotes every scalar that YAML 1.1 would re-type.
//!   Measured by emitting 34 tricky strings and loading them with PyYAML 6.0: the output of
//!   `serde_yaml_ng` 0.10 does not even load (`=` left plain is PyYAML's `value` tag) and it
//!   leaves `2001-12-14`, `1_000`, `<<` plain; `yaml-rust2` 0.13 and `saphyr` 0.0.6 leave
//!   `2001-12-14`, `1_000`, `0b101` plain and write U+0085/U+2028 raw, which YAML 1.1 reads
//!   as line breaks (PyYAML fails to load). (`serde_yaml` is deprecated.) So
//!   [`emit_settings`] is a small emitter of our own: block mappings/sequences, **every
//!   string double-quoted** with YAML double-quoted escapes, and **only ASCII** in the
//!   output (everything else escaped as `\xXX`/`\uXXXX`/`\UXXXXXXXX`) so neither YAML 1.1
//!   line breaks nor the app's locale can garble it. Floats are written so PyYAML's float
//!   regex matches them: always a `.`, a signed exponent, `.inf`/`-.inf`/`.nan`.
//!   `tests/it/foundation.rs` checks the result against the real PyYAML.
//!
//! The module is the three stages of that round trip, each in its own file, around the
//! one [`Value`] type they share (defined here with [`YamlError`]):
//!
//! * `read.rs` — parser events to a [`Value`] tree: anchors and aliases, `<<` merges,
//!   duplicate keys, tags on collections. It asks `resolve` what each scalar is.
//! * `resolve.rs` — scalar text to a typed [`Value`]: an explicit tag (`!!int`, `!`) or
//!   PyYAML's implicit resolvers (bool, null, int, float, timestamp, in PyYAML's order).
//! * `emit.rs` — a [`Value`] back to text for Python: `settings.yaml` (double-quoted ASCII
//!   strings, PyYAML-shaped floats) and Python's `str()` of a scalar for `env` values.
//!
//! The split follows the direction of the data, so a change to what PyYAML reads (a
//! resolver) and a change to what we write (the emitter) land in different files, and
//! the emitter can check a timestamp with the same `is_timestamp` the reader resolves by.

mod emit;
mod read;
mod resolve;

pub use emit::{emit_settings, format_float, python_float_repr, python_str, quote};
pub use read::parse;
pub use resolve::resolve_plain;

/// A YAML value with PyYAML's `safe_load` types.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// PyYAML ints are unbounded; 128 bits cover anything a config holds.
    Int(i128),
    Float(f64),
    Str(String),
    /// A plain scalar PyYAML reads as `datetime.date`/`datetime.datetime`, kept as written
    /// so it is written back plain and read back as the same date.
    Timestamp(String),
    Seq(Vec<Value>),
    /// Insertion-ordered; keys are scalars.
    Map(Vec<(Value, Value)>),
}

impl Value {
    /// Short type name for error messages ("expected a string, found a list").
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Timestamp(_) => "a date",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The value of a string key in a mapping.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The plain-scalar text of a non-string scalar, as PyYAML would write it
    /// (`true`, `42`, `1.5`, `null`); `None` for strings and collections.
    pub fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Null => Some("null".into()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(format_float(*f)),
            Value::Timestamp(t) => Some(t.clone()),
            Value::Str(_) | Value::Seq(_) | Value::Map(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum YamlError {
    #[error("invalid YAML at line {line} column {col}: {msg}")]
    Syntax {
        line: usize,
        col: usize,
        msg: String,
    },
    #[error("expected a single YAML document, found {0}")]
    MultipleDocuments(usize),
    #[error("unsupported YAML tag {tag} at line {line}")]
    UnsupportedTag { tag: String, line: usize },
    #[error("invalid {kind} {text:?} at line {line}")]
    BadScalar {
        kind: &'static str,
        text: String,
        line: usize,
    },
    #[error("a {found} cannot be a mapping key (line {line})")]
    BadKey { found: &'static str, line: usize },
    #[error("a << merge key needs a mapping or a list of mappings, found {found} (line {line})")]
    BadMerge { found: &'static str, line: usize },
    #[error("unknown alias at line {line}")]
    UnknownAlias { line: usize },
    #[error("cannot write {0} into settings.yaml")]
    Unwritable(String),
}

/// What PyYAML makes of `s` written plain: the tests of `resolve` and `emit` both ask.
#[cfg(test)]
fn plain(s: &str) -> Value {
    resolve_plain(s.to_string())
}
