//! PAX extended header records (`x`, `X` and `g` entries), as GNU tar 1.34 reads them
//! (`xheader.c`: `decode_record` and the keyword decoders).
//!
//! A record is `LEN SP KEY=VALUE LF`, where `LEN` counts the whole record: the length,
//! not the newline, delimits it, so a value may contain newlines (ACL texts, binary
//! xattrs) and NUL bytes. GNU tar stops silently at a NUL where a length should start
//! (padding); we also require that nothing but NULs follows, because other readers (Go)
//! refuse what GNU tar ignores there. Everything GNU tar reports as an error is refused.

use super::Mtime;

/// One `KEY=VALUE` record; the value is raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Split a PAX body into records. The error says what is wrong, for one line on stderr.
pub fn parse(body: &[u8]) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    let mut start = 0usize;
    while start < body.len() {
        let mut p = start;
        while p < body.len() && matches!(body[p], b' ' | b'\t') {
            p += 1;
        }
        if p == body.len() || body[p] == 0 {
            if let Some(i) = body[p..].iter().position(|&b| b != 0) {
                return Err(format!(
                    "unexpected byte {:#04x} after the end of the PAX records (at byte {})",
                    body[p + i],
                    p + i
                ));
            }
            break;
        }
        if !body[p].is_ascii_digit() {
            return Err(format!(
                "malformed PAX record at byte {start}: missing length"
            ));
        }
        let digits_end = p + body[p..].iter().take_while(|b| b.is_ascii_digit()).count();
        let len = std::str::from_utf8(&body[p..digits_end])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        if len > body.len() - start {
            return Err(format!(
                "PAX record at byte {start} claims {} bytes, only {} left",
                String::from_utf8_lossy(&body[p..digits_end]),
                body.len() - start
            ));
        }
        let next = start + len;
        let mut k = digits_end;
        while k < body.len() && matches!(body[k], b' ' | b'\t') {
            k += 1;
        }
        if k == digits_end {
            return Err(format!(
                "malformed PAX record at byte {start}: missing blank after the length"
            ));
        }
        // strchr: the first `=` before any NUL.
        let eq = body[k..]
            .iter()
            .position(|&b| b == b'=' || b == 0)
            .map(|i| k + i)
            .filter(|&i| body[i] == b'=' && i < next);
        let Some(eq) = eq else {
            return Err(format!(
                "malformed PAX record at byte {start}: no `=` within its {len} bytes"
            ));
        };
        if body[next - 1] != b'\n' {
            return Err(format!(
                "malformed PAX record `{}` at byte {start}: its {len} bytes do not end in a newline",
                String::from_utf8_lossy(&body[k..eq])
            ));
        }
        out.push(Record {
            key: body[k..eq].to_vec(),
            value: body[eq + 1..next - 1].to_vec(),
        });
        start = next;
    }
    Ok(out)
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// A decimal integer as GNU tar's `decode_signed_num` takes it: an optional `-`, digits,
/// nothing after them; in `min..=max`.
pub fn integer(key: &[u8], v: &[u8], min: i128, max: i128) -> Result<i128, String> {
    let digits = v.strip_prefix(b"-").unwrap_or(v);
    let bad = || format!("invalid PAX {}={}", text(key), text(v));
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) || digits.len() > 30 {
        return Err(bad());
    }
    let n: i128 = std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    if !(min..=max).contains(&n) {
        return Err(format!(
            "PAX {}={} is out of range {min}..{max}",
            text(key),
            text(v)
        ));
    }
    Ok(n)
}

/// A time as GNU tar's `decode_timespec`: `[-]SECONDS[.FRACTION]`, nanoseconds truncated
/// toward minus infinity. Trailing junk, which GNU tar ignores, is refused (Go refuses it).
pub fn time(key: &[u8], v: &[u8]) -> Result<Mtime, String> {
    let bad = || format!("invalid PAX {}={}", text(key), text(v));
    let (negative, rest) = match v.strip_prefix(b"-") {
        Some(r) => (true, r),
        None => (false, v),
    };
    let (secs, frac) = match rest.iter().position(|&b| b == b'.') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if secs.is_empty() || !secs.iter().all(u8::is_ascii_digit) || secs.len() > 30 {
        return Err(bad());
    }
    let frac = frac.unwrap_or_default();
    if !frac.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let whole: i128 = std::str::from_utf8(secs)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let mut ns: i64 = 0;
    for i in 0..9 {
        ns = ns * 10 + frac.get(i).map_or(0, |d| i64::from(d - b'0'));
    }
    let trailing_nonzero = frac.iter().skip(9).any(|&d| d != b'0');
    let mut s = if negative { -whole } else { whole };
    if negative {
        ns += i64::from(trailing_nonzero);
        if ns != 0 {
            s -= 1;
            ns = 1_000_000_000 - ns;
        }
    }
    let secs = i64::try_from(s).map_err(|_| {
        format!(
            "PAX {}={} is out of the range of a time",
            text(key),
            text(v)
        )
    })?;
    Ok(Mtime {
        secs,
        nanos: ns as u32,
    })
}

/// A value that becomes a C string in GNU tar: everything up to the first NUL.
pub fn c_string(v: &[u8]) -> &[u8] {
    super::header::cstr(v)
}

/// GNU tar's `xattr_decode_keyword`: `%3D` is `=`, `%25` is `%`.
pub fn xattr_name(encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        if encoded[i] == b'%' {
            match encoded.get(i + 1..i + 3) {
                Some(b"3D") => {
                    out.push(b'=');
                    i += 3;
                    continue;
                }
                Some(b"25") => {
                    out.push(b'%');
                    i += 3;
                    continue;
                }
                _ => {}
            }
        }
        out.push(encoded[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(k: &str, v: &[u8]) -> Vec<u8> {
        let body = [b" ", k.as_bytes(), b"=", v, b"\n"].concat();
        let mut n = body.len() + 1;
        while n.to_string().len() + body.len() != n {
            n += 1;
        }
        [n.to_string().as_bytes(), &body].concat()
    }

    #[test]
    fn length_delimits_records_not_newlines() {
        let acl = b"user::rw-\nuser:1000:r--\ngroup::r--\nmask::r--\nother::r--\n";
        let body = [rec("SCHILY.acl.access", acl), rec("path", b"a\nb")].concat();
        let r = parse(&body).unwrap();
        assert_eq!(r[0].value, acl);
        assert_eq!(r[1].key, b"path");
        assert_eq!(r[1].value, b"a\nb");
        // NUL padding after the records is fine, anything else is not.
        assert_eq!(
            parse(&[body.clone(), vec![0; 30]].concat()).unwrap().len(),
            2
        );
        assert!(parse(&[body.clone(), b"\0junk".to_vec()].concat()).is_err());
    }

    #[test]
    fn malformed_records_are_refused() {
        // The last record lacks its newline (GNU tar: "missing newline").
        assert!(parse(b"9 path=ab").unwrap_err().contains("newline"));
        assert!(parse(b"30 path=x\n").unwrap_err().contains("claims"));
        assert!(parse(b"10path=abc\n").unwrap_err().contains("blank"));
        assert!(parse(b"7 pa\n=\n").is_ok());
        assert!(parse(b"6 abc\n").unwrap_err().contains("`=`"));
        assert!(parse(b"x path=a\n").unwrap_err().contains("length"));
        // A short length that ends before the `=`.
        assert!(parse(b"3 path=a\n").is_err());
    }

    #[test]
    fn times_and_numbers() {
        let t = |v: &str| time(b"mtime", v.as_bytes());
        assert_eq!(
            t("1.5").unwrap(),
            Mtime {
                secs: 1,
                nanos: 500_000_000
            }
        );
        assert_eq!(
            t("-1.5").unwrap(),
            Mtime {
                secs: -2,
                nanos: 500_000_000
            }
        );
        assert_eq!(t("-1").unwrap(), Mtime { secs: -1, nanos: 0 });
        assert_eq!(t("12.").unwrap(), Mtime { secs: 12, nanos: 0 });
        assert_eq!(
            t("1.1234567891").unwrap(),
            Mtime {
                secs: 1,
                nanos: 123_456_789
            }
        );
        assert!(t("1x").is_err());
        assert!(t("").is_err());
        assert!(t("99999999999999999999").is_err());
        assert_eq!(integer(b"uid", b"-0", 0, 5), Ok(0));
        assert!(integer(b"uid", b"+1", 0, 5).is_err());
        assert!(integer(b"uid", b"6", 0, 5).is_err());
        assert!(integer(b"uid", b" 1", 0, 5).is_err());
        assert_eq!(xattr_name(b"user.a%3Db%25c%2"), b"user.a=b%c%2");
    }
}
