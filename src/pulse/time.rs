//! Event-time helpers: all times are epoch milliseconds (`i64`) in memory and RFC 3339
//! with millisecond precision, UTC (`2026-11-22T10:00:00.123Z`) on the wire.

use chrono::{DateTime, SecondsFormat, Utc};

/// Formats epoch milliseconds as RFC 3339 (ms, `Z`). Out-of-range values (which
/// validation never lets through) fall back to the epoch rather than panicking.
pub fn format_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses RFC 3339 into epoch milliseconds (sub-millisecond digits are truncated).
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
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
}
