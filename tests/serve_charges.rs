//! `GET /v1/charges` and `GET /v1/aggregations` of `pulses serve` (SPEC §9): the charges
//! `pulses rate` writes, read back from serve's charges view with exact totals per sku
//! and per currency, by billing period and time range, re-sent charges counted once,
//! tenant keys scoped to their tenant, and bad parameters refused with a 400.
//! Expected money is computed by hand in the comments (tests/common/rating.rs BOOK).

mod common;

use std::collections::BTreeSet;

use common::agg::*;
use common::rating::*;
use common::serve::*;
use common::*;
use serde_json::Value;

/// A final (or corrected) aggregate of one sku, as stage 2 writes it.
fn aggregate_of(tenant: &str, sku: &str, unit: &str, start: i64, total: &str, revision: u32) -> (Option<Vec<u8>>, Vec<u8>) {
    let v = serde_json::json!({
        "aggregate_id": format!("agg-{tenant}-{sku}-{start}"), "revision": revision, "tenant_id": tenant,
        "product_sku": sku, "use_unit": unit, "window": "minute",
        "window_start": rfc3339(start), "window_end": rfc3339(start + 60 * SECOND),
        "total_amount": total, "pulse_count": 1, "min_amount": total, "max_amount": total,
        "first_event_time": rfc3339(start), "last_event_time": rfc3339(start), "final": true,
        "emitted_at": rfc3339(start + 65 * SECOND)
    });
    (Some(tenant.as_bytes().to_vec()), serde_json::to_vec(&v).unwrap())
}

fn get(addr: &str, key: &str, path_and_query: &str) -> (u16, Value) {
    let res = client().get(format!("http://{addr}{path_and_query}")).header("X-API-Key", key).send().expect("GET");
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

/// (sku, unit, currency, quantity, amount, charges) rows of an answer's `totals`.
fn totals(answer: &Value) -> Vec<(String, String, String, String, String, u64)> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    answer["totals"].as_array().expect("totals").iter()
        .map(|t| (s(&t["product_sku"]), s(&t["use_unit"]), s(&t["currency"]), s(&t["quantity"]), s(&t["amount"]), t["charges"].as_u64().unwrap_or(0)))
        .collect()
}

fn total(answer: &Value) -> Vec<(String, String, u64)> {
    answer["total"].as_array().expect("total").iter()
        .map(|t| (t["currency"].as_str().unwrap_or_default().to_owned(), t["amount"].as_str().unwrap_or_default().to_owned(), t["charges"].as_u64().unwrap_or(0)))
        .collect()
}

fn row(sku: &str, unit: &str, quantity: &str, amount: &str, charges: u64) -> (String, String, String, String, String, u64) {
    (sku.into(), unit.into(), "USD".into(), quantity.into(), amount.into(), charges)
}

#[test]
fn charges_are_served_per_tenant_and_period_with_exact_totals() {
    let t = Topics::create("charges", 3);
    let cfg = format!("{}\n[topics]\ncharges = \"{app}.charges\"\nalerts = \"{app}.alerts\"\n", config("1h", "2s"), app = t.app);
    // October and November 2026, UTC.
    let (oct, nov) = (1_790_812_800_000_i64, 1_793_491_200_000_i64);
    produce(&t.aggregated, &[
        // two, October: 100 GB × 0.10 = 10.000; corrected to 150 GB: 10 + 50 × 0.08 = 14.000, delta 4.000.
        aggregate_of("two", "storage", "GB", oct + 3_600_000, "100", 0),
        aggregate_of("two", "storage", "GB", oct + 3_600_000, "150", 1),
        // two, November: a new period, tiers start again: 50 GB × 0.10 = 5.000.
        aggregate_of("two", "storage", "GB", nov + 7_200_000, "50", 0),
        // two, November: 7 requests × 0.001 = 0.007.
        aggregate_of("two", "api.requests", "request", nov + 60_000, "7", 0),
        // one, November: 300 requests = 0.300.
        aggregate_of("one", "api.requests", "request", nov + 120_000, "300", 0),
    ]);
    let rate = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), Some((&format!("{}.charges", t.app), &format!("{}.alerts", t.app))));
    let (_, admin) = create_key(&t, None);
    let (_, one_key) = create_key(&t, Some("one"));
    let (_serve, addr) = start_serve(&t, &cfg);

    // 10 + 4 + 5 + 0.007 = 19.007 for two, in 4 charges.
    let all = wait_for("two's charges in the view", DEADLINE, || {
        let (status, answer) = get(&addr, &admin, "/v1/charges?tenant_id=two");
        (status == 200 && total(&answer) == vec![("USD".into(), "19.007".into(), 4)]).then_some(answer)
    });
    assert_eq!(totals(&all), vec![row("api.requests", "request", "7", "0.007", 1), row("storage", "GB", "200", "19.000", 3)]);
    // The answer is the charges topic's records of tenant two, each once, by window start.
    let written: Vec<Value> = read_all(&rate.charges).iter().map(|r| r.json()).filter(|c| c["tenant_id"] == "two").collect();
    let ids = |cs: &[Value]| cs.iter().map(|c| c["charge_id"].as_str().unwrap_or_default().to_owned()).collect::<BTreeSet<_>>();
    let served = all["charges"].as_array().expect("charges").clone();
    assert_eq!(ids(&served), ids(&written));
    assert_eq!(served.len(), 4);
    let starts: Vec<&str> = served.iter().map(|c| c["window_start"].as_str().unwrap_or_default()).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "by window start: {starts:?}");
    for c in &served {
        let w = written.iter().find(|w| w["charge_id"] == c["charge_id"]).expect("written");
        assert_eq!(c, w, "served as written");
    }

    // By period, and by time range.
    let (status, october) = get(&addr, &admin, "/v1/charges?tenant_id=two&period=2026-10");
    assert_eq!(status, 200, "{october}");
    assert_eq!((totals(&october), october["period"].as_str()), (vec![row("storage", "GB", "150", "14.000", 2)], Some("2026-10")));
    let (_, november) = get(&addr, &admin, "/v1/charges?tenant_id=two&period=2026-11&product_sku=storage");
    assert_eq!(totals(&november), vec![row("storage", "GB", "50", "5.000", 1)]);
    let (_, hour) = get(&addr, &admin, &format!("/v1/charges?tenant_id=two&from={}&to={}", rfc3339(nov), rfc3339(nov + 3_600_000)));
    assert_eq!(total(&hour), vec![("USD".into(), "0.007".into(), 1)]);

    // A re-sent charge (same charge_id) is counted once.
    let resent: Vec<(Option<Vec<u8>>, Vec<u8>)> = read_all(&rate.charges).iter().map(|r| (r.key.clone(), r.value.clone())).collect();
    produce(&rate.charges, &resent);
    let marker = aggregate_of("two", "api.requests", "request", nov + 180_000, "1", 0);
    produce(&t.aggregated, &[marker]);
    // The marker's charge (0.001) arrives after the re-sent ones: then the total is 19.008 in 5.
    let again = wait_for("the marker's charge in the view", DEADLINE, || {
        let (_, answer) = get(&addr, &admin, "/v1/charges?tenant_id=two");
        (total(&answer) != vec![("USD".into(), "19.007".into(), 4)]).then_some(answer)
    });
    assert_eq!(total(&again), vec![("USD".into(), "19.008".into(), 5)], "re-sent charges counted once");

    // A tenant key sees its own tenant only.
    let (status, own) = get(&addr, &one_key, "/v1/charges");
    assert_eq!((status, total(&own)), (200, vec![("USD".into(), "0.300".into(), 1)]));
    let (status, other) = get(&addr, &one_key, "/v1/charges?tenant_id=two");
    assert_eq!((status, other["error"].as_str()), (403, Some("forbidden_tenant")), "{other}");

    // Bad parameters: 400 with a reason.
    for (query, says) in [
        ("tenant_id=two&period=2026-13", "is not a billing period"),
        ("tenant_id=two&period=november", "is not a billing period"),
        ("tenant_id=two&from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z", "`to` is before `from`"),
        ("tenant_id=two&from=yesterday", "is not an RFC 3339 time"),
    ] {
        let (status, answer) = get(&addr, &admin, &format!("/v1/charges?{query}"));
        assert_eq!((status, answer["error"].as_str()), (400, Some("invalid_parameter")), "{query}: {answer}");
        assert!(answer["detail"].as_str().unwrap_or_default().contains(says), "{query}: {answer}");
    }
    let (status, answer) = get(&addr, &admin, "/v1/charges");
    assert_eq!((status, answer["error"].as_str()), (400, Some("missing_parameter")), "{answer}");
}

#[test]
fn aggregations_answer_as_usage_does() {
    let t = Topics::create("aggregations", 1);
    let cfg = config("1h", "2s");
    let nov = 1_793_491_200_000_i64;
    produce(&t.aggregated, &[aggregate_of("two", "storage", "GB", nov, "12.5", 0), aggregate_of("two", "storage", "GB", nov + 60_000, "0.25", 0)]);
    let (_, admin) = create_key(&t, None);
    let (_serve, addr) = start_serve(&t, &cfg);
    let usage = wait_for("two's usage", DEADLINE, || {
        let (_, u) = get(&addr, &admin, "/v1/usage?tenant_id=two&window=minute");
        (u["windows"].as_array().map(Vec::len) == Some(2)).then_some(u)
    });
    let (status, aggregations) = get(&addr, &admin, "/v1/aggregations?tenant_id=two&window=minute");
    assert_eq!(status, 200);
    assert_eq!((&aggregations["windows"], &aggregations["totals"]), (&usage["windows"], &usage["totals"]));
    assert_eq!(aggregations["totals"][0]["total_amount"].as_str(), Some("12.75"));
}
