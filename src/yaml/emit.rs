//! Emitting: a [`Value`] back to text that Python reads as the same value. Two outputs:
//! [`emit_settings`], the text of `settings.yaml` (the app's `yaml.safe_load` must get
//! back exactly the proc.yaml `settings`; why this is our own emitter is in the module
//! note of `yaml`), and [`python_str`], Python's `str()` of a scalar, which is what the
//! Python runner wrote for a non-string `env` value. Both follow CPython/PyYAML output
//! rules (float repr, timestamps) rather than Rust's, and each is tested against what
//! the Python side prints.

use super::resolve::is_timestamp;
use super::{Value, YamlError};

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
    use crate::yaml::{parse, plain};

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
