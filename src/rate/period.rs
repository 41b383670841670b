//! The billing period: the UTC calendar month of a window's start, named `YYYY-MM`.
//! The ledger's balances, the charges' `period` and (later) invoices all use it.

use chrono::{NaiveDate, TimeZone, Utc};

/// The period of a window starting at `window_start_ms`.
pub fn of(window_start_ms: i64) -> String {
    chrono::DateTime::<Utc>::from_timestamp_millis(window_start_ms).unwrap_or_default().format("%Y-%m").to_string()
}

/// `[start, end)` in ms of the period named `name`, which must be exactly `YYYY-MM`.
pub fn bounds(name: &str) -> Result<(i64, i64), String> {
    let bad = || format!("{name:?} is not a billing period: expected YYYY-MM, e.g. 2026-11");
    let (y, m) = name.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 || !y.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (y, m): (i32, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    let first = NaiveDate::from_ymd_opt(y, m, 1).ok_or_else(bad)?;
    let next = if m == 12 { NaiveDate::from_ymd_opt(y + 1, 1, 1) } else { NaiveDate::from_ymd_opt(y, m + 1, 1) }.ok_or_else(bad)?;
    let ms = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| Utc.from_utc_datetime(&t).timestamp_millis());
    Ok((ms(first).ok_or_else(bad)?, ms(next).ok_or_else(bad)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn months_have_their_calendar_bounds() {
        assert_eq!(bounds("2026-11"), Ok((1_793_491_200_000, 1_796_083_200_000)));
        assert_eq!(bounds("2026-12").unwrap().1, bounds("2027-01").unwrap().0);
        assert_eq!(bounds("2028-02").map(|(s, e)| (e - s) / 86_400_000), Ok(29), "a leap February");
        for bad in ["2026-13", "2026-00", "2026-1", "26-11", "2026/11", "2026-11-01", "", "abcd-ef", "+026-11"] {
            assert!(bounds(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        /// Every instant lies in the period `of` names, and that period's bounds hold it.
        #[test]
        fn an_instant_is_inside_its_period(ms in 0i64..4_102_444_800_000) {
            let (start, end) = bounds(&of(ms)).unwrap();
            prop_assert!(start <= ms && ms < end);
            prop_assert_eq!(of(start), of(end - 1));
            prop_assert_ne!(of(end), of(start));
        }
    }
}
