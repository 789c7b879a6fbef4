//! Resolving: what a scalar's text is, as PyYAML decides it. An explicit tag (`!!str`,
//! `!!int`, the non-specific `!`) is obeyed; a quoted scalar is a string; a plain one goes
//! through PyYAML's implicit resolvers (`yaml/resolver.py`) in PyYAML's order of
//! precedence, with YAML 1.1 syntax: `yes`/`on` booleans, `0123` octal, `1:20`
//! sexagesimal, `1_000`, timestamps, and floats that need a `.`. Nothing here knows the
//! document structure (`read.rs`) or how values are written back (`emit.rs`, which
//! borrows [`is_timestamp`] so it never writes a date PyYAML would not read as one).

use yaml_rust2::parser::Tag;
use yaml_rust2::scanner::TScalarStyle;

use super::{Value, YamlError};

const CORE_TAG: &str = "tag:yaml.org,2002:";

fn tag_suffix(tag: &Tag) -> Option<&str> {
    (tag.handle == CORE_TAG || tag.handle == "!!").then_some(tag.suffix.as_str())
}

fn tag_text(tag: &Tag) -> String {
    format!("{}{}", tag.handle, tag.suffix)
}

pub(super) fn check_collection_tag(
    tag: Option<&Tag>,
    want: &str,
    line: usize,
) -> Result<(), YamlError> {
    match tag {
        None => Ok(()),
        Some(t) if tag_suffix(t) == Some(want) => Ok(()),
        Some(t) => Err(YamlError::UnsupportedTag {
            tag: tag_text(t),
            line,
        }),
    }
}

pub(super) fn scalar(
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
pub(super) fn is_timestamp(s: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::plain;

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
}
