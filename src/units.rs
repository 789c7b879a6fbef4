//! Sizes and durations as users write them, with one grammar for every place that reads
//! one (`mem_limit` in proc.yaml, `vrun cache gc --max-size`, `VRUN_CACHE_MAX_SIZE`), and
//! sizes as vrun prints them (indicatif's `HumanBytes`, the same as the progress bar;
//! one decimal where a size sits inside a sentence).
//!
//! Before this module the proc.yaml reader and the gc flags parsed sizes with different
//! code, so `1.5G` was a valid gc limit and an invalid memory limit.

use std::time::Duration;

/// Bytes, or a number (a decimal fraction allowed) with `K`, `M`, `G` or `T` — powers
/// of 1024, any case, optionally followed by `B` or `iB`: `268435456`, `512k`, `256MB`,
/// `1.5G`, `20GiB`. Whitespace around and before the unit is ignored. A fraction of a
/// byte is dropped.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let invalid = || format!("invalid size {s:?}: expected e.g. 500M, 20G or a byte count");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(invalid());
    }
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {unit:?} (use K, M, G or T)"
            ))
        }
    };
    let too_big = || format!("invalid size {s:?}: too large");
    let whole: u64 = match whole {
        "" => 0,
        w => w.parse().map_err(|_| too_big())?,
    };
    let mut bytes = whole.checked_mul(mult).ok_or_else(too_big)?;
    if !frac.is_empty() {
        // At most 19 digits fit a u64; later ones cannot change a whole byte count of
        // any size this grammar reaches.
        let digits = &frac[..frac.len().min(12)];
        let scale = 10u128.pow(digits.len() as u32);
        let part = digits.parse::<u128>().map_err(|_| invalid())? * u128::from(mult) / scale;
        bytes = bytes.checked_add(part as u64).ok_or_else(too_big)?;
    }
    Ok(bytes)
}

/// A number with `s`, `m`, `h`, `d` or `w`: `30d`, `12h`, `90m`, `2w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let err = || format!("invalid duration {s:?}: expected e.g. 30d, 12h, 90m, 2w");
    let (num, unit) = t.split_at(t.len().saturating_sub(1));
    let value: u64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(err()),
    };
    Ok(Duration::from_secs(value * secs))
}

/// `1536` → `1.50 KiB`: how a size is shown to a user (the progress bar's format).
pub fn human_size(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// `1536` → `1.5 KiB`, `2097152` → `2.0 MiB`: one decimal, for sizes inside a sentence
/// (`vrun demo`'s step lines and timings summary, whose output the README shows).
pub fn short_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_grammar_for_sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("12"), Ok(12));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("256MB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size(" 2 T "), Ok(2 << 40));
        for bad in ["big", "5Q", "-1", "M", "", ".", "1.2.3G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations_and_display() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert!(parse_duration("12").is_err());
        assert!(parse_duration("d").is_err());
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.50 KiB");
        assert_eq!(human_size(200 << 20), "200.00 MiB");
        assert_eq!(short_size(512), "512 B");
        assert_eq!(short_size(1536), "1.5 KiB");
        assert_eq!(short_size(3 << 40), "3072.0 GiB");
    }
}
