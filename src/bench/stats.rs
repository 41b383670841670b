//! Pure statistics of `pulses bench`: percentiles of exact samples, quantiles of
//! Prometheus histograms, and what `/proc` and `/metrics` say about the processor.

use std::collections::BTreeMap;

/// The `q` quantile (0..=1) of `samples` by nearest rank (no interpolation: every
/// reported value was really observed). None when there are no samples.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The `q` quantile of a histogram given as cumulative `(upper bound, count)` buckets
/// and its total count, interpolated linearly inside the bucket like Prometheus'
/// `histogram_quantile` (the first bucket starts at 0). Observations above the last
/// bound answer that bound. None when the histogram is empty.
pub fn histogram_quantile(buckets: &[(f64, u64)], count: u64, q: f64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let target = q.clamp(0.0, 1.0) * count as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(bound, cumulative) in buckets {
        if cumulative as f64 >= target && cumulative > below {
            let share = (target - below as f64) / (cumulative - below) as f64;
            return Some(lower + (bound - lower) * share.clamp(0.0, 1.0));
        }
        (lower, below) = (bound, cumulative);
    }
    buckets.last().map(|(bound, _)| *bound)
}

/// CPU seconds per million pulses.
pub fn per_million(cpu_seconds: f64, pulses: u64) -> f64 {
    if pulses == 0 {
        0.0
    } else {
        cpu_seconds / (pulses as f64 / 1e6)
    }
}

/// Pulses per second over `seconds` (0 for an empty interval).
pub fn rate(pulses: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        pulses as f64 / seconds
    } else {
        0.0
    }
}

/// User + system CPU seconds from the text of `/proc/<pid>/stat` (fields 14 and 15,
/// counted after the command name, which may itself hold spaces or parentheses).
pub fn proc_cpu_seconds(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state), so utime (14) and stime (15) are 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second)
}

/// Peak resident set size in bytes: `VmHWM` of `/proc/<pid>/status`.
pub fn peak_rss_bytes(status: &str) -> Option<u64> {
    status_bytes(status, "VmHWM")
}

/// A `kB` field (`VmHWM`, `VmRSS`, ...) of a `/proc/<pid>/status` text, in bytes.
pub fn status_bytes(status: &str, field: &str) -> Option<u64> {
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a Prometheus text exposition (comments skipped; label values
/// without escaped quotes, which is all pulses writes).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(parse_sample).collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.trim().rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series, BTreeMap::new()),
        Some((name, rest)) => {
            let mut labels = BTreeMap::new();
            for pair in rest.trim_end_matches('}').split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"")?;
                labels.insert(k.trim_start_matches(',').to_owned(), v.trim_end_matches('"').to_owned());
            }
            (name, labels)
        }
    };
    Some(Sample { name: name.to_owned(), labels, value })
}

/// The value of the sample `name` whose labels include `labels` (summed if several match).
pub fn sample_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v)))
        .map(|s| s.value)
        .sum()
}

/// The cumulative buckets (finite bounds only) and the count of histogram `name` for
/// one `window` label.
pub fn histogram(samples: &[Sample], name: &str, window: &str) -> (Vec<(f64, u64)>, u64) {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, u64)> = samples
        .iter()
        .filter(|s| s.name == bucket && s.labels.get("window").is_some_and(|w| w == window))
        .filter_map(|s| Some((s.labels.get("le")?.parse::<f64>().ok()?, s.value as u64)))
        .filter(|(le, _)| le.is_finite())
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = sample_value(samples, &format!("{name}_count"), &[("window", window)]) as u64;
    (buckets, count)
}

/// p50 and p99 of exact samples.
pub fn p50_p99(samples: &[f64]) -> (Option<f64>, Option<f64>) {
    (percentile(samples, 0.50), percentile(samples, 0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&s, 0.5), Some(50.0));
        assert_eq!(percentile(&s, 0.99), Some(99.0));
        assert_eq!(percentile(&s, 1.0), Some(100.0));
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn histogram_quantiles_interpolate_inside_the_bucket() {
        // 10 observations in (0, 0.5], 10 in (0.5, 1.0].
        let b = [(0.5, 10), (1.0, 20), (2.5, 20)];
        assert_eq!(histogram_quantile(&b, 20, 0.5), Some(0.5));
        assert_eq!(histogram_quantile(&b, 20, 0.25), Some(0.25));
        assert_eq!(histogram_quantile(&b, 20, 0.75), Some(0.75));
        assert_eq!(histogram_quantile(&b, 20, 1.0), Some(1.0));
        // Above the last bound: the last bound.
        assert_eq!(histogram_quantile(&b, 30, 0.99), Some(2.5));
        assert_eq!(histogram_quantile(&b, 0, 0.5), None);
        // Empty leading buckets are skipped, not answered.
        assert_eq!(histogram_quantile(&[(0.1, 0), (1.0, 4)], 4, 0.5), Some(0.55));
    }

    #[test]
    fn cpu_and_rates() {
        assert_eq!(per_million(3.0, 500_000), 6.0);
        assert_eq!(per_million(3.0, 0), 0.0);
        assert_eq!(rate(1000, 0.5), 2000.0);
        assert_eq!(rate(1000, 0.0), 0.0);
    }

    #[test]
    fn reads_proc_stat_and_status() {
        let stat = "4242 (pulses (x) y) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 9 0 1 2 3";
        assert_eq!(proc_cpu_seconds(stat, 100.0), Some(3.0));
        assert_eq!(proc_cpu_seconds("garbage", 100.0), None);
        let status = "Name:\tpulses\nVmPeak:\t  900 kB\nVmHWM:\t  204800 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(peak_rss_bytes(status), Some(200 * 1024 * 1024));
        assert_eq!(peak_rss_bytes("Name: x\n"), None);
        assert_eq!(status_bytes(status, "VmRSS"), Some(1000 * 1024));
    }

    #[test]
    fn parses_the_exposition_pulses_writes() {
        let text = "# HELP x y\n# TYPE pulses_records_consumed_total counter\n\
            pulses_records_consumed_total{stage=\"group\",topic=\"a.b\"} 5\n\
            pulses_records_consumed_total{stage=\"aggregate\",topic=\"c\"} 7\n\
            pulses_corrections_total 2\n\
            pulses_window_close_delay_seconds_bucket{window=\"inflight\",le=\"0.5\"} 3\n\
            pulses_window_close_delay_seconds_bucket{window=\"inflight\",le=\"0.1\"} 1\n\
            pulses_window_close_delay_seconds_bucket{window=\"inflight\",le=\"+Inf\"} 4\n\
            pulses_window_close_delay_seconds_bucket{window=\"postflight\",le=\"0.5\"} 9\n\
            pulses_window_close_delay_seconds_count{window=\"inflight\"} 4\n";
        let s = parse_exposition(text);
        assert_eq!(sample_value(&s, "pulses_records_consumed_total", &[("stage", "aggregate")]), 7.0);
        assert_eq!(sample_value(&s, "pulses_records_consumed_total", &[]), 12.0);
        assert_eq!(sample_value(&s, "pulses_corrections_total", &[]), 2.0);
        assert_eq!(sample_value(&s, "missing", &[]), 0.0);
        let (b, n) = histogram(&s, "pulses_window_close_delay_seconds", "inflight");
        assert_eq!(b, vec![(0.1, 1), (0.5, 3)]);
        assert_eq!(n, 4);
    }
}
