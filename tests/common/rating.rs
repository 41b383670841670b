//! `pulses rate` in tests: a price book, starting a rating replica with its own output
//! topics, and aggregate records as stage 2 writes them.

use std::str::FromStr;

use rust_decimal::Decimal;

use super::agg::*;
use super::*;

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// $0.001 per request, rounded to 3 places, one alert at $0.020.
pub const BOOK: &str = r#"
currency = "USD"
rounding = { scale = 3, mode = "half_even" }
thresholds = ["0.020"]

[[prices]]
product_sku = "api.requests"
use_unit = "request"
model = "flat"
unit_price = "0.001"

[[prices]]
product_sku = "storage"
use_unit = "GB"
model = "graduated"
tiers = [{ up_to = "100", unit_price = "0.10" }, { unit_price = "0.08" }]
"#;

pub struct Rating {
    pub charges: String,
    pub alerts: String,
    pub proc: Proc,
}

/// Starts `pulses rate` on `t`'s aggregated topic with its own charges/alerts topics.
pub fn start_rate(t: &Topics, config_toml: &str, state: tempfile::TempDir, outputs: Option<(&str, &str)>) -> Rating {
    let (charges, alerts) = match outputs {
        Some((c, a)) => (c.to_owned(), a.to_owned()),
        None => {
            let (c, a) = (format!("{}.charges", t.app), format!("{}.alerts", t.app));
            create_topics(&[(&c, 3), (&a, 3)]);
            (c, a)
        }
    };
    let book = state.path().join("price-book.toml");
    std::fs::write(&book, BOOK).unwrap();
    let book = book.to_string_lossy().into_owned();
    let proc = Proc::start("rate", t, config_toml, &["--price-book", &book, "--charges-topic", &charges, "--alerts-topic", &alerts], state);
    Rating { charges, alerts, proc }
}

/// Waits until the charges in `topic` sum to `total`, then asserts there are `count`.
pub fn wait_charged(topic: &str, total: &str, count: usize) {
    let sum = || -> Decimal { read_all(topic).iter().map(|r| d(r.json()["amount"].as_str().unwrap_or("0"))).sum() };
    wait_for(&format!("charges summing to {total}"), DEADLINE, || (sum() == d(total)).then_some(()));
    assert_eq!(read_all(topic).len(), count, "one charge per tenant and final window");
}

pub fn amounts(topic: &str) -> Vec<(String, Decimal)> {
    read_all(topic).iter().map(|r| {
        let v = r.json();
        assert_eq!(r.key_str(), v["tenant_id"].as_str().unwrap(), "keyed by tenant");
        (v["charge_id"].as_str().unwrap_or_default().to_owned(), d(v["amount"].as_str().unwrap_or("0")))
    }).collect()
}

/// Aggregate records as stage 2 writes them, produced by hand.
pub fn aggregate(tenant: &str, start: i64, total: &str, revision: u32, is_final: bool) -> (Option<Vec<u8>>, Vec<u8>) {
    let v = serde_json::json!({
        "aggregate_id": format!("agg-{tenant}-{start}"), "revision": revision, "tenant_id": tenant,
        "product_sku": "storage", "use_unit": "GB", "window": "minute",
        "window_start": rfc3339(start), "window_end": rfc3339(start + 60 * SECOND),
        "total_amount": total, "pulse_count": 1, "min_amount": total, "max_amount": total,
        "first_event_time": rfc3339(start), "last_event_time": rfc3339(start), "final": is_final,
        "emitted_at": rfc3339(start + 65 * SECOND)
    });
    (Some(tenant.as_bytes().to_vec()), serde_json::to_vec(&v).unwrap())
}

