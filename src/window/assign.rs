//! Window assignment: tumbling windows aligned to the epoch.

/// The `[start, end)` of the window of `size_ms` holding `event_ms`. An event exactly
/// at a window's end belongs to the next window.
pub fn window_bounds(event_ms: i64, size_ms: i64) -> (i64, i64) {
    let start = event_ms - event_ms.rem_euclid(size_ms);
    (start, start + size_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries() {
        assert_eq!(window_bounds(0, 1_000), (0, 1_000));
        assert_eq!(window_bounds(999, 1_000), (0, 1_000));
        assert_eq!(window_bounds(1_000, 1_000), (1_000, 2_000)); // end belongs to the next
        assert_eq!(window_bounds(1_795_341_659_999, 60_000), (1_795_341_600_000, 1_795_341_660_000));
        assert_eq!(window_bounds(1_795_341_660_000, 60_000), (1_795_341_660_000, 1_795_341_720_000));
        assert_eq!(window_bounds(-1, 1_000), (-1_000, 0));
    }
}
