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
//!   regex matches them: always a `.`, a signed
//!   exponent, `.inf`/`-.inf`/`.nan`. `tests/foundation.rs` checks the result against the
//!   real PyYAML.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

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

/// Parse one YAML document the way PyYAML's `safe_load` does. `Ok(None)` for an empty
/// stream (PyYAML returns `None`).
pub fn parse(text: &str) -> Result<Option<Value>, YamlError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, true)
        .map_err(|e| YamlError::Syntax {
            line: e.marker().line(),
            col: e.marker().col() + 1,
            msg: e.info().to_string(),
        })?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    match builder.docs.len() {
        0 => Ok(None),
        1 => Ok(builder.docs.pop()),
        n => Err(YamlError::MultipleDocuments(n)),
    }
}

/// Builds [`Value`]s from parser events, resolving plain scalars as PyYAML does.
#[derive(Default)]
struct Builder {
    docs: Vec<Value>,
    stack: Vec<OpenCollection>,
    anchors: HashMap<usize, Value>,
    error: Option<YamlError>,
}

/// A collection whose end event has not come yet.
struct OpenCollection {
    node: Value,
    anchor: usize,
    /// For a mapping: the key waiting for its value, and whether it is the plain `<<`.
    pending_key: Option<(Value, bool)>,
}

impl Builder {
    fn push_node(
        &mut self,
        node: Value,
        anchor: usize,
        is_merge: bool,
        line: usize,
    ) -> Result<(), YamlError> {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some(OpenCollection {
            node: parent,
            pending_key,
            ..
        }) = self.stack.last_mut()
        else {
            self.docs.push(node);
            return Ok(());
        };
        match parent {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match pending_key.take() {
                None => {
                    if matches!(node, Value::Seq(_) | Value::Map(_)) {
                        return Err(YamlError::BadKey {
                            found: node.kind(),
                            line,
                        });
                    }
                    *pending_key = Some((node, is_merge));
                }
                Some((_, true)) => merge_into(entries, node, line)?,
                Some((key, false)) => insert_entry(entries, key, node),
            },
            _ => unreachable!("only collections are pushed on the stack"),
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event, mark: Marker) -> Result<(), YamlError> {
        let line = mark.line();
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let is_merge = style == TScalarStyle::Plain && tag.is_none() && text == "<<";
                let node = scalar(text, style, tag.as_ref(), line)?;
                self.push_node(node, anchor, is_merge, line)?;
            }
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or(YamlError::UnknownAlias { line })?;
                self.push_node(node, 0, false, line)?;
            }
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "seq", line)?;
                self.stack.push(OpenCollection {
                    node: Value::Seq(Vec::new()),
                    anchor,
                    pending_key: None,
                });
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "map", line)?;
                self.stack.push(OpenCollection {
                    node: Value::Map(Vec::new()),
                    anchor,
                    pending_key: None,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let open = self.stack.pop().expect("balanced events");
                let (node, anchor) = (open.node, open.anchor);
                self.push_node(node, anchor, false, line)?;
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
        Ok(())
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_none() {
            if let Err(e) = self.handle(ev, mark) {
                self.error = Some(e);
            }
        }
    }
}

/// A duplicate key replaces the earlier value, as in PyYAML.
fn insert_entry(entries: &mut Vec<(Value, Value)>, key: Value, value: Value) {
    match entries.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => entries.push((key, value)),
    }
}

/// The `<<` merge key: merge a mapping (or a list of them) in; keys already present win.
fn merge_into(
    entries: &mut Vec<(Value, Value)>,
    value: Value,
    line: usize,
) -> Result<(), YamlError> {
    let sources = match value {
        Value::Map(m) => vec![m],
        Value::Seq(items) => items
            .into_iter()
            .map(|v| match v {
                Value::Map(m) => Ok(m),
                other => Err(other),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|other| YamlError::BadMerge {
                found: other.kind(),
                line,
            })?,
        other => {
            return Err(YamlError::BadMerge {
                found: other.kind(),
                line,
            })
        }
    };
    for (k, v) in sources.into_iter().flatten() {
        if !entries.iter().any(|(existing, _)| *existing == k) {
            entries.push((k, v));
        }
    }
    Ok(())
}

const CORE_TAG: &str = "tag:yaml.org,2002:";

fn tag_suffix(tag: &Tag) -> Option<&str> {
    (tag.handle == CORE_TAG || tag.handle == "!!").then_some(tag.suffix.as_str())
}

fn tag_text(tag: &Tag) -> String {
    format!("{}{}", tag.handle, tag.suffix)
}

fn check_collection_tag(tag: Option<&Tag>, want: &str, line: usize) -> Result<(), YamlError> {
    match tag {
        None => Ok(()),
        Some(t) if tag_suffix(t) == Some(want) => Ok(()),
        Some(t) => Err(YamlError::UnsupportedTag {
            tag: tag_text(t),
            line,
        }),
    }
}

fn scalar(
    text: String,
    style: TScalarStyle,
    tag: Option<&Tag>,
    line: usize,
) -> Result<Value, YamlError> {
    let bad = |kind| YamlError::BadScalar {
        kind,
        text: text.clone(),
        line,
    };
    if let Some(tag) = tag {
        // `!` alone (non-specific tag) means "a string" for a scalar in PyYAML.
        if tag.handle == "!" && tag.suffix.is_empty() {
            return Ok(Value::Str(text));
        }
        return match tag_suffix(tag) {
            Some("str") => Ok(Value::Str(text)),
            Some("int") => parse_int(&text).map(Value::Int).ok_or_else(|| bad("int")),
            Some("float") => parse_float(&text)
                .or_else(|| parse_int(&text).map(|i| i as f64))
                .map(Value::Float)
                .ok_or_else(|| bad("float")),
            Some("bool") => parse_bool(&text)
                .map(Value::Bool)
                .ok_or_else(|| bad("bool")),
            Some("null") => Ok(Value::Null),
            _ => Err(YamlError::UnsupportedTag {
                tag: tag_text(tag),
                line,
            }),
        };
    }
    if style != TScalarStyle::Plain {
        return Ok(Value::Str(text));
    }
    Ok(resolve_plain(text))
}

/// PyYAML's implicit resolvers (`yaml/resolver.py`), in its order of precedence.
pub fn resolve_plain(text: String) -> Value {
    if let Some(b) = parse_bool(&text) {
        return Value::Bool(b);
    }
    if is_null(&text) {
        return Value::Null;
    }
    if is_float_syntax(&text) {
        if let Some(f) = parse_float(&text) {
            return Value::Float(f);
        }
    }
    if is_int_syntax(&text) {
        if let Some(i) = parse_int(&text) {
            return Value::Int(i);
        }
    }
    if is_timestamp(&text) {
        return Value::Timestamp(text);
    }
    Value::Str(text)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => Some(true),
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

fn split_sign(s: &str) -> (bool, &str) {
    match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    }
}

fn all(s: &str, f: impl Fn(u8) -> bool) -> bool {
    s.bytes().all(f)
}

fn is_digit_(b: u8) -> bool {
    b.is_ascii_digit() || b == b'_'
}

/// `[0-9][0-9_]*`
fn is_dec_digits(s: &str) -> bool {
    s.as_bytes().first().is_some_and(u8::is_ascii_digit) && all(s, is_digit_)
}

/// `(?::[0-5]?[0-9])+` — the sexagesimal tail, without its leading `:`.
fn is_sexagesimal_tail(parts: &[&str]) -> bool {
    !parts.is_empty()
        && parts.iter().all(|p| {
            let b = p.as_bytes();
            match b.len() {
                1 => b[0].is_ascii_digit(),
                2 => (b'0'..=b'5').contains(&b[0]) && b[1].is_ascii_digit(),
                _ => false,
            }
        })
}

/// PyYAML's int regex:
/// `[-+]?0b[0-1_]+ | [-+]?0[0-7_]+ | [-+]?(?:0|[1-9][0-9_]*) | [-+]?0x[0-9a-fA-F_]+
///  | [-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+`
fn is_int_syntax(s: &str) -> bool {
    let (_, body) = split_sign(s);
    if let Some(bin) = body.strip_prefix("0b") {
        return !bin.is_empty() && all(bin, |b| matches!(b, b'0' | b'1' | b'_'));
    }
    if let Some(hex) = body.strip_prefix("0x") {
        return !hex.is_empty() && all(hex, |b| b.is_ascii_hexdigit() || b == b'_');
    }
    if body == "0" {
        return true;
    }
    if let Some(oct) = body.strip_prefix('0') {
        return !oct.is_empty() && all(oct, |b| matches!(b, b'0'..=b'7' | b'_'));
    }
    let mut parts = body.split(':');
    let head = parts.next().unwrap_or("");
    let first_ok = head
        .as_bytes()
        .first()
        .is_some_and(|b| (b'1'..=b'9').contains(b))
        && all(head, is_digit_);
    let tail: Vec<&str> = parts.collect();
    first_ok && (tail.is_empty() || is_sexagesimal_tail(&tail))
}

/// PyYAML's `construct_yaml_int`.
fn parse_int(s: &str) -> Option<i128> {
    let cleaned: String = s.chars().filter(|&c| c != '_').collect();
    let (neg, body) = split_sign(&cleaned);
    let magnitude = if body == "0" {
        0
    } else if let Some(bin) = body.strip_prefix("0b") {
        i128::from_str_radix(bin, 2).ok()?
    } else if let Some(hex) = body.strip_prefix("0x") {
        i128::from_str_radix(hex, 16).ok()?
    } else if let Some(oct) = body.strip_prefix('0') {
        i128::from_str_radix(oct, 8).ok()?
    } else if body.contains(':') {
        let mut total: i128 = 0;
        for part in body.split(':') {
            total = total
                .checked_mul(60)?
                .checked_add(part.parse::<i128>().ok()?)?;
        }
        total
    } else {
        body.parse::<i128>().ok()?
    };
    Some(if neg { -magnitude } else { magnitude })
}

/// `(?:[eE][-+][0-9]+)?` at the end of `s`: returns what precedes the exponent.
fn strip_exponent(s: &str) -> Option<&str> {
    match s.find(['e', 'E']) {
        None => Some(s),
        Some(i) => {
            let exp = &s[i + 1..];
            let digits = exp.strip_prefix(['-', '+'])?;
            (!digits.is_empty() && all(digits, |b| b.is_ascii_digit())).then_some(&s[..i])
        }
    }
}

/// PyYAML's float regex:
/// `[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)? | \.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
///  | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]* | [-+]?\.(?:inf|Inf|INF) | \.(?:nan|NaN|NAN)`
fn is_float_syntax(s: &str) -> bool {
    if matches!(s, ".nan" | ".NaN" | ".NAN") {
        return true;
    }
    let (_, body) = split_sign(s);
    if matches!(body, ".inf" | ".Inf" | ".INF") {
        return true;
    }
    // `\.[0-9][0-9_]*(exp)?` takes no sign.
    if let Some(frac) = s.strip_prefix('.') {
        return strip_exponent(frac).is_some_and(is_dec_digits);
    }
    let Some((int_part, frac_part)) = body.split_once('.') else {
        return false;
    };
    if int_part.contains(':') {
        let mut parts = int_part.split(':');
        let head = parts.next().unwrap_or("");
        let tail: Vec<&str> = parts.collect();
        return is_dec_digits(head) && is_sexagesimal_tail(&tail) && all(frac_part, is_digit_);
    }
    is_dec_digits(int_part) && strip_exponent(frac_part).is_some_and(|f| all(f, is_digit_))
}

/// PyYAML's `construct_yaml_float`.
fn parse_float(s: &str) -> Option<f64> {
    let cleaned: String = s.chars().filter(|&c| c != '_').collect::<String>();
    let lower = cleaned.to_ascii_lowercase();
    let (neg, body) = split_sign(&lower);
    let sign = if neg { -1.0 } else { 1.0 };
    if body == ".inf" {
        return Some(sign * f64::INFINITY);
    }
    if body == ".nan" {
        return Some(f64::NAN);
    }
    if body.contains(':') {
        let mut total = 0.0;
        for part in body.split(':') {
            total = total * 60.0 + part.parse::<f64>().ok()?;
        }
        return Some(sign * total);
    }
    body.parse::<f64>().ok().map(|f| sign * f)
}

/// PyYAML's timestamp regex: `YYYY-MM-DD` or
/// `YYYY-M?M-D?D([Tt]|[ \t]+)H?H:MM:SS(\.[0-9]*)?([ \t]*(Z|[-+]H?H(:MM)?))?`.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: &[u8]| !r.is_empty() && r.iter().all(u8::is_ascii_digit);
    if b.len() == 10 && digits(&b[0..4]) && b[4] == b'-' && digits(&b[5..7]) && b[7] == b'-' {
        return digits(&b[8..10]);
    }
    // Long form: parse with a tiny cursor.
    let mut i = 0;
    let take_digits = |i: &mut usize, min: usize, max: usize| -> bool {
        let start = *i;
        while *i < b.len() && *i - start < max && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start >= min
    };
    let eat = |i: &mut usize, c: u8| -> bool {
        if *i < b.len() && b[*i] == c {
            *i += 1;
            true
        } else {
            false
        }
    };
    if !(take_digits(&mut i, 4, 4)
        && eat(&mut i, b'-')
        && take_digits(&mut i, 1, 2)
        && eat(&mut i, b'-')
        && take_digits(&mut i, 1, 2))
    {
        return false;
    }
    if !(eat(&mut i, b'T') || eat(&mut i, b't')) {
        let start = i;
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    if !(take_digits(&mut i, 1, 2)
        && eat(&mut i, b':')
        && take_digits(&mut i, 2, 2)
        && eat(&mut i, b':')
        && take_digits(&mut i, 2, 2))
    {
        return false;
    }
    if eat(&mut i, b'.') {
        take_digits(&mut i, 0, usize::MAX);
    }
    if i == b.len() {
        return true;
    }
    while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
        i += 1;
    }
    if eat(&mut i, b'Z') {
        return i == b.len();
    }
    if !(eat(&mut i, b'-') || eat(&mut i, b'+')) || !take_digits(&mut i, 1, 2) {
        return false;
    }
    if eat(&mut i, b':') && !take_digits(&mut i, 2, 2) {
        return false;
    }
    i == b.len()
}

/// Python's `str()` of a scalar as PyYAML's `safe_load` gives it: what the original
/// runner wrote for a non-string `env` value (`"%s" % value`) — `True`, `False`, `None`,
/// `42`, `1e+20`, `inf`, `2001-12-14`, `2001-12-14 21:59:43.100000-05:00`. An error for
/// collections, and for a date PyYAML itself cannot construct (month 13).
pub fn python_str(v: &Value) -> Result<String, String> {
    match v {
        Value::Null => Ok("None".into()),
        Value::Bool(true) => Ok("True".into()),
        Value::Bool(false) => Ok("False".into()),
        Value::Int(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(python_float_repr(*f)),
        Value::Str(s) => Ok(s.clone()),
        Value::Timestamp(t) => python_timestamp_str(t),
        Value::Seq(_) | Value::Map(_) => Err(format!("{} has no scalar text", v.kind())),
    }
}

/// Python 3's `repr(float)` (= `str`): the shortest digits that round-trip, positional
/// for decimal exponents -4..=15, else `d.ddde+XX` with at least two exponent digits.
pub fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "1.5e0", "1e20", "-2.5e-7".
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let body = if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        return format!("{sign}{body}");
    }
    let mantissa = if digits.len() > 1 {
        format!("{}.{}", &digits[..1], &digits[1..])
    } else {
        digits
    };
    let esign = if exp < 0 { '-' } else { '+' };
    format!("{sign}{mantissa}e{esign}{:02}", exp.abs())
}

/// `str()` of the `datetime.date`/`datetime.datetime` PyYAML 6 constructs from a
/// timestamp scalar (fraction cut to microseconds, an offset kept as a fixed timezone).
fn python_timestamp_str(text: &str) -> Result<String, String> {
    let bad = |why: &str| format!("{text:?} is not a date PyYAML can load: {why}");
    let b = text.as_bytes();
    let mut i = 0;
    let number = |i: &mut usize, max: usize| -> Option<u32> {
        let start = *i;
        while *i < b.len() && *i - start < max && b[*i].is_ascii_digit() {
            *i += 1;
        }
        text[start..*i].parse().ok()
    };
    let year = number(&mut i, 4).ok_or_else(|| bad("year"))?;
    i += 1;
    let month = number(&mut i, 2).ok_or_else(|| bad("month"))?;
    i += 1;
    let day = number(&mut i, 2).ok_or_else(|| bad("day"))?;
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if year == 0 || !(1..=12).contains(&month) {
        return Err(bad("year or month out of range"));
    }
    if day == 0 || day > month_days[month as usize - 1] {
        return Err(bad("day out of range"));
    }
    let date = format!("{year:04}-{month:02}-{day:02}");
    if i == b.len() {
        return Ok(date);
    }
    while i < b.len() && matches!(b[i], b'T' | b't' | b' ' | b'\t') {
        i += 1;
    }
    let hour = number(&mut i, 2).ok_or_else(|| bad("hour"))?;
    i += 1;
    let minute = number(&mut i, 2).ok_or_else(|| bad("minute"))?;
    i += 1;
    let second = number(&mut i, 2).ok_or_else(|| bad("second"))?;
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("time out of range"));
    }
    let mut micros = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let mut frac: String = text[start..i].chars().take(6).collect();
        while frac.len() < 6 {
            frac.push('0');
        }
        micros = frac.parse::<u32>().unwrap_or(0);
    }
    while i < b.len() && matches!(b[i], b' ' | b'\t') {
        i += 1;
    }
    let tz = match b.get(i) {
        None => String::new(),
        Some(b'Z') => "+00:00".into(),
        Some(&sign) => {
            i += 1;
            let h = number(&mut i, 2).ok_or_else(|| bad("offset"))?;
            let m = if i < b.len() && b[i] == b':' {
                i += 1;
                number(&mut i, 2).ok_or_else(|| bad("offset"))?
            } else {
                0
            };
            // timedelta(hours=h, minutes=m); Python refuses a whole day or more.
            if h * 60 + m >= 24 * 60 {
                return Err(bad("offset of a day or more"));
            }
            let sign = if sign == b'-' && h * 60 + m > 0 {
                '-'
            } else {
                '+'
            };
            format!("{sign}{h:02}:{m:02}")
        }
    };
    let frac = if micros > 0 {
        format!(".{micros:06}")
    } else {
        String::new()
    };
    Ok(format!(
        "{date} {hour:02}:{minute:02}:{second:02}{frac}{tz}"
    ))
}

/// A float PyYAML reads back as the same float: a `.` always, a signed exponent,
/// `.inf`/`-.inf`/`.nan`. Rust's `{:?}` gives the shortest round-trip digits.
pub fn format_float(f: f64) -> String {
    if f.is_nan() {
        return ".nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { ".inf" } else { "-.inf" }.into();
    }
    let text = format!("{f:?}");
    let (mantissa, exponent) = match text.split_once('e') {
        Some((m, e)) => (m.to_string(), Some(e)),
        None => (text.clone(), None),
    };
    let mantissa = if mantissa.contains('.') {
        mantissa
    } else {
        format!("{mantissa}.0")
    };
    match exponent {
        None => mantissa,
        Some(e) if e.starts_with('-') => format!("{mantissa}e{e}"),
        Some(e) => format!("{mantissa}e+{e}"),
    }
}

/// A YAML double-quoted scalar holding only printable ASCII (see the module note).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            ' '..='~' => out.push(c),
            c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02X}", c as u32)),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push_str(&format!("\\U{:08X}", c as u32)),
        }
    }
    out.push('"');
    out
}

fn emit_scalar(v: &Value) -> Result<String, YamlError> {
    Ok(match v {
        Value::Str(s) => quote(s),
        Value::Seq(items) if items.is_empty() => "[]".into(),
        Value::Map(entries) if entries.is_empty() => "{}".into(),
        Value::Timestamp(t) if !is_timestamp(t) => {
            return Err(YamlError::Unwritable(format!("timestamp {t:?}")))
        }
        other => other
            .scalar_text()
            .ok_or_else(|| YamlError::Unwritable(other.kind().into()))?,
    })
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Seq(items) => !items.is_empty(),
        Value::Map(entries) => !entries.is_empty(),
        _ => false,
    }
}

/// Emit a non-empty collection in block style at `indent`; when `inline_first`, the
/// first line continues a `- ` already written.
fn emit_block(
    v: &Value,
    indent: usize,
    inline_first: bool,
    out: &mut String,
) -> Result<(), YamlError> {
    let pad = " ".repeat(indent);
    let mut first = true;
    let mut line_start = |out: &mut String| {
        if !(first && inline_first) {
            out.push_str(&pad);
        }
        first = false;
    };
    match v {
        Value::Map(entries) => {
            for (k, val) in entries {
                if is_block(k) {
                    return Err(YamlError::Unwritable(format!("{} as a key", k.kind())));
                }
                line_start(out);
                out.push_str(&emit_scalar(k)?);
                out.push(':');
                if is_block(val) {
                    out.push('\n');
                    emit_block(val, indent + 2, false, out)?;
                } else {
                    out.push(' ');
                    out.push_str(&emit_scalar(val)?);
                    out.push('\n');
                }
            }
        }
        Value::Seq(items) => {
            for item in items {
                line_start(out);
                out.push_str("- ");
                if is_block(item) {
                    emit_block(item, indent + 2, true, out)?;
                } else {
                    out.push_str(&emit_scalar(item)?);
                    out.push('\n');
                }
            }
        }
        _ => unreachable!("emit_block takes collections"),
    }
    Ok(())
}

/// The text of `settings.yaml`: `value` such that PyYAML's `safe_load` returns it.
pub fn emit_settings(value: &Value) -> Result<String, YamlError> {
    let mut out = String::from("# Written by vrun setup from proc.yaml `settings`.\n");
    if is_block(value) {
        emit_block(value, 0, false, &mut out)?;
    } else {
        out.push_str(&emit_scalar(value)?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(s: &str) -> Value {
        resolve_plain(s.to_string())
    }

    #[test]
    fn resolves_plain_scalars_like_pyyaml() {
        for s in ["yes", "No", "on", "OFF", "true"] {
            assert!(matches!(plain(s), Value::Bool(_)), "{s}");
        }
        for s in [
            "y", "n", "1e3", "=", "09", "0x", "1:60", "@x", "-", "0b2", "<<", ".5e3",
        ] {
            assert_eq!(plain(s), Value::Str(s.into()), "{s}");
        }
        assert_eq!(plain("1_000_"), Value::Int(1000));
        assert_eq!(plain("0123"), Value::Int(83));
        assert_eq!(plain("1:20"), Value::Int(80));
        assert_eq!(plain("1_000"), Value::Int(1000));
        assert_eq!(plain("0x1F"), Value::Int(31));
        assert_eq!(plain("0b101"), Value::Int(5));
        assert_eq!(plain("+1"), Value::Int(1));
        assert_eq!(plain("-0"), Value::Int(0));
        assert_eq!(plain("1.5"), Value::Float(1.5));
        assert_eq!(plain("1.0e+3"), Value::Float(1000.0));
        assert_eq!(plain("1.0e3"), Value::Str("1.0e3".into()));
        assert_eq!(plain("-.inf"), Value::Float(f64::NEG_INFINITY));
        assert_eq!(plain("1:30.5"), Value::Float(90.5));
        assert_eq!(plain("~"), Value::Null);
        assert_eq!(plain("2001-12-14"), Value::Timestamp("2001-12-14".into()));
        assert!(matches!(
            plain("2001-12-14t21:59:43.10-05:00"),
            Value::Timestamp(_)
        ));
        assert!(matches!(
            plain("2001-12-14 21:59:43.10 -5"),
            Value::Timestamp(_)
        ));
        assert!(matches!(plain("2001-12-14 21:59"), Value::Str(_)));
    }

    #[test]
    fn parses_documents() {
        let v = parse("a: &x {b: 1}\nc: *x\nd:\n  <<: *x\n  e: 'yes'\n")
            .unwrap()
            .unwrap();
        assert_eq!(v.get("c"), v.get("a"));
        let d = v.get("d").unwrap();
        assert_eq!(d.get("b"), Some(&Value::Int(1)));
        assert_eq!(d.get("e"), Some(&Value::Str("yes".into())));
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
        assert!(matches!(
            parse("a: [").unwrap_err(),
            YamlError::Syntax { .. }
        ));
        assert!(matches!(
            parse("a\n---\nb\n").unwrap_err(),
            YamlError::MultipleDocuments(2)
        ));
        assert_eq!(parse("!!str 12").unwrap(), Some(Value::Str("12".into())));
        assert_eq!(
            parse("k: v\nk: w\n").unwrap().unwrap().get("k"),
            Some(&Value::Str("w".into()))
        );
    }

    #[test]
    fn python_str_of_scalars_is_what_python_prints() {
        // Each right-hand side is `str(v)` in CPython 3 of what PyYAML loads.
        for (yaml, want) in [
            ("true", "True"),
            ("off", "False"),
            ("~", "None"),
            ("0123", "83"),
            ("1.0e+20", "1e+20"),
            ("1.5", "1.5"),
            ("100.0", "100.0"),
            ("1.0e+15", "1000000000000000.0"),
            ("1.0e+16", "1e+16"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("-2.5e-7", "-2.5e-07"),
            ("1.5e+300", "1.5e+300"),
            (".inf", "inf"),
            ("-.inf", "-inf"),
            (".nan", "nan"),
            ("-0.0", "-0.0"),
            ("1:30.5", "90.5"),
            ("2001-12-14", "2001-12-14"),
            (
                "2001-12-14t21:59:43.10-05:00",
                "2001-12-14 21:59:43.100000-05:00",
            ),
            ("2001-12-14 21:59:43.10", "2001-12-14 21:59:43.100000"),
            ("2001-12-14T21:59:43Z", "2001-12-14 21:59:43+00:00"),
            ("2001-1-5 1:02:03 +1", "2001-01-05 01:02:03+01:00"),
        ] {
            assert_eq!(python_str(&plain(yaml)).unwrap(), want, "{yaml}");
        }
        assert!(python_str(&plain("2001-13-14")).is_err());
    }

    #[test]
    fn formats_floats_pyyaml_reads_as_floats() {
        assert_eq!(format_float(1.0), "1.0");
        assert_eq!(format_float(0.1), "0.1");
        assert_eq!(format_float(1e100), "1.0e+100");
        assert_eq!(format_float(-2.5e-7), "-2.5e-7");
        assert_eq!(format_float(f64::NAN), ".nan");
        for f in [
            1.0,
            0.1,
            1e100,
            -2.5e-7,
            123456.789,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert_eq!(plain(&format_float(f)), Value::Float(f), "{f}");
        }
    }

    #[test]
    fn emitted_settings_parse_back() {
        let src = "a: 'yes'\nb: [1, 'x', [], {}]\nc: {d: {e: [ {f: 1.5}, [2, 3] ]}}\ng: null\nh: 2001-12-14\n\"\\u00e9\": \"t\\u2028\\U0001F600\\x85\"\n";
        let v = parse(src).unwrap().unwrap();
        let text = emit_settings(&v).unwrap();
        assert!(text.is_ascii(), "{text}");
        assert_eq!(parse(&text).unwrap().unwrap(), v, "{text}");
    }
}
