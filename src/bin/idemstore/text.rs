//! Text helpers of the CLI: JSON strings (serde_json), base64 (the `base64` crate), RFC 3339
//! times and duration parsing (humantime), and the short human forms of durations and sizes
//! the tool prints in its columns (a few lines each, no crate writes these two forms).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// `s` as a JSON string literal, quotes included.
pub fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// `s` for a terminal: control characters escaped as in Rust string literals.
pub fn printable(s: &str) -> String {
    if s.chars().any(char::is_control) {
        let debug = format!("{s:?}");
        debug[1..debug.len() - 1].to_owned()
    } else {
        s.to_owned()
    }
}

/// Standard base64 with padding (RFC 4648, section 4).
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// RFC 3339 in UTC with milliseconds, such as `2024-05-01T12:00:00.000Z`. Times before the
/// epoch are shown as the epoch (a store keeps none: it counts time from the epoch, up to the
/// year 2554, well inside what humantime formats).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t.max(UNIX_EPOCH)).to_string()
}

/// A short human duration: `850ms`, `42s`, `5m12s`, `3h04m`, `2d05h`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        format!("{}ms", d.as_millis())
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600)
    }
}

/// `t` relative to `now`: `12s ago` or `in 5m00s`.
pub fn relative(t: SystemTime, now: SystemTime) -> String {
    match now.duration_since(t) {
        Ok(ago) => format!("{} ago", human_duration(ago)),
        Err(e) => format!("in {}", human_duration(e.duration())),
    }
}

/// A byte count: `512 B`, `1.5 KiB`, `3.2 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Parses a duration in humantime's syntax: numbers with units, such as `90s`, `5m`, `1h30m`,
/// `2d`, `500ms`, `1h 30min`, `2weeks`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!(
            "{text:?} is not a duration ({e}); write numbers with units (ms, s, m, h, d, w), \
             e.g. 5m or 1h30m"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\u0001""#);
        assert_eq!(json_string("é"), "\"é\"");
        let nasty = "\u{7f}\u{8}\u{c}\u{1f}\u{2028}";
        let back: String = serde_json::from_str(&json_string(nasty)).unwrap();
        assert_eq!(back, nasty);
    }

    #[test]
    fn times_and_durations() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5m-").is_err());
        // humantime's syntax: spaces and long unit names too.
        assert_eq!(parse_duration("5 minutes"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h 30min"), Ok(Duration::from_secs(5400)));
        assert_eq!(human_duration(Duration::from_secs(312)), "5m12s");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
