//! A plain HTTP/1.1 GET client and a Prometheus text parser for the ops tests: the
//! test talks to the endpoint like a scraper or a kubelet would.

use std::collections::BTreeMap;

/// GET `path` from `addr`: (status code, body), or None if nothing answers yet.
pub use pulses::bench::processor::http_get as get;

/// Samples of a Prometheus text exposition: `name{labels}` (as written) → value.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Scrapes `/metrics` and parses it.
pub fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (status, body) = get(addr, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}
