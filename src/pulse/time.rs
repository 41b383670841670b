//! Event-time helpers: all times are epoch milliseconds (`i64`) in memory and RFC 3339
//! with millisecond precision, UTC (`2026-11-22T10:00:00.123Z`) on the wire; and the
//! durations of configuration and flags (`250ms`, `5s`, `1h`).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer};

/// Formats epoch milliseconds as RFC 3339 (ms, `Z`). Out-of-range values (which
/// validation never lets through) fall back to the epoch rather than panicking.
pub fn format_ms(ms: i64) -> String {
    // Every grouped pulse and aggregate carries such times: years 0..=9999 are written
    // by hand (chrono's formatter was several times slower), anything else by chrono.
    if (0..=MAX_RFC3339_MS).contains(&ms) {
        let (days, ms_of_day) = (ms.div_euclid(DAY_MS), ms.rem_euclid(DAY_MS));
        let (year, month, day) = civil_from_days(days);
        let (h, m, sec, milli) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1_000 % 60, ms_of_day % 1_000);
        let mut b = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut v: i64| {
            for i in (at..at + width).rev() {
                b[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, h);
        put(14, 2, m);
        put(17, 2, sec);
        put(20, 3, milli);
        return b.iter().map(|&c| char::from(c)).collect();
    }
    chrono_format(ms)
}

fn chrono_format(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses RFC 3339 into epoch milliseconds (sub-millisecond digits are truncated).
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    parse_canonical(s.as_bytes()).or_else(|| chrono_parse(s))
}

fn chrono_parse(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
}

const DAY_MS: i64 = 86_400_000;
/// 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can write with a 4-digit year.
pub const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

/// The form pulses write, `YYYY-MM-DDTHH:MM:SS.mmmZ` or `YYYY-MM-DDTHH:MM:SSZ`, parsed
/// by hand; None for anything else (offsets, other precisions, leap seconds,
/// impossible dates), which chrono then parses or refuses.
fn parse_canonical(b: &[u8]) -> Option<i64> {
    let milli = match b.len() {
        24 if b[19] == b'.' && b[23] == b'Z' => digits(&b[20..23])?,
        20 if b[19] == b'Z' => 0,
        _ => return None,
    };
    if (b[4], b[7], b[10], b[13], b[16]) != (b'-', b'-', b'T', b':', b':') {
        return None;
    }
    let (year, month, day) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (h, m, sec) = (digits(&b[11..13])?, digits(&b[14..16])?, digits(&b[17..19])?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) || h > 23 || m > 59 || sec > 59 {
        return None;
    }
    Some(days_from_civil(year, month, day) * DAY_MS + ((h * 60 + m) * 60 + sec) * 1_000 + milli)
}

fn digits(b: &[u8]) -> Option<i64> {
    b.iter().try_fold(0i64, |n, &c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The current wall-clock time in epoch milliseconds.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Serde adapter: `i64` epoch milliseconds <-> RFC 3339 string.
pub mod rfc3339_ms {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_ms(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::parse_rfc3339_ms(&s).ok_or_else(|| D::Error::custom(format!("not RFC 3339: {s}")))
    }
}

/// Parses durations such as `250ms`, `5s`, `1m`, `1h`, `1d` (one number, one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 5s, 1m, 1h, 1d"))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use ms, s, m, h or d")),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(|| format!("{s:?} is too long"))
}

/// Serde adapter for [`parse_duration`].
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_milliseconds() {
        let ms = 1_795_341_600_123; // 2026-11-22T10:00:00.123Z
        assert_eq!(format_ms(ms), "2026-11-22T10:00:00.123Z");
        assert_eq!(parse_rfc3339_ms("2026-11-22T10:00:00.123Z"), Some(ms));
        assert_eq!(parse_rfc3339_ms("2026-11-22T11:00:00.123+01:00"), Some(ms));
    }

    #[test]
    fn hand_written_times_agree_with_chrono() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let edges = [0, 1, 999, DAY_MS - 1, 951_782_400_000, 951_868_799_999, 4_107_542_400_000, MAX_RFC3339_MS, MAX_RFC3339_MS - 86_400_000];
        let random = (0..20_000).map(|_| rng.gen_range(0..=MAX_RFC3339_MS));
        for ms in edges.into_iter().chain(random) {
            let text = format_ms(ms);
            assert_eq!(text, chrono_format(ms), "format {ms}");
            assert_eq!(parse_canonical(text.as_bytes()), Some(ms), "parse {text}");
            let seconds = &text[..19];
            assert_eq!(parse_canonical(format!("{seconds}Z").as_bytes()), chrono_parse(&format!("{seconds}Z")), "{seconds}Z");
        }
        // Out of range: chrono's fallback, as before.
        assert_eq!(format_ms(-1), chrono_format(-1));
        assert_eq!(format_ms(MAX_RFC3339_MS + 1), chrono_format(MAX_RFC3339_MS + 1));
    }

    #[test]
    fn impossible_or_unusual_times_go_to_chrono() {
        for text in [
            "2026-02-29T00:00:00.000Z", // not a leap year
            "2024-02-30T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T10:60:00Z",
            "2026-12-31T23:59:60Z", // leap second
            "2026-11-22t10:00:00z",
            "2026-11-22T10:00:00.1234Z",
            "2026-11-22T10:00:00.12Z",
            "2026-11-22 10:00:00Z",
            "+026-11-22T10:00:00Z",
            "2026-11-22T10:00:00.1x3Z",
        ] {
            assert_eq!(parse_canonical(text.as_bytes()), None, "{text}");
            assert_eq!(parse_rfc3339_ms(text), chrono_parse(text), "{text}");
        }
        assert_eq!(parse_canonical(b"2024-02-29T23:59:59.999Z"), chrono_parse("2024-02-29T23:59:59.999Z"));
    }
}
