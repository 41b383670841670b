//! When a billing period is closed for a tenant: every window of it is final. Stage 2
//! closes a window when its partition's watermark reaches `window_end + grace` (see
//! [`crate::window::operator`]); every window of a period ends at or before the period's
//! end, so the period is closed once the watermark reaches `period_end + grace`.

/// Whether a watermark of `watermark_ms` has closed every window ending by `period_end_ms`.
pub fn is_closed(watermark_ms: i64, period_end_ms: i64, grace_ms: i64) -> bool {
    period_end_ms.saturating_add(grace_ms) <= watermark_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_exactly_when_the_last_window_is() {
        let end = 1_796_083_200_000; // 2026-12-01T00:00:00Z
        assert!(!is_closed(end, end, 5_000));
        assert!(!is_closed(end + 4_999, end, 5_000));
        assert!(is_closed(end + 5_000, end, 5_000), "the same bound that closes the window [end - 1m, end)");
        assert!(!is_closed(i64::MIN, end, 5_000), "no watermark yet");
    }
}
