//! The usage dashboard in a real browser (headless Debian chromium through
//! chromedriver) against a live `pulses serve` fed by `pulses run`: a key entered,
//! the chart drawn with data points, the totals table equal to `/v1/usage`, quota
//! bars, and a new pulse showing up after a refresh. A screenshot is saved and its
//! path printed (CI keeps it as an artifact).

mod common;

use std::str::FromStr;
use std::time::Duration;

use common::agg::*;
use common::browser::Browser;
use common::serve::*;
use common::*;
use rust_decimal::Decimal;
use serde_json::Value;

fn p(id: &str, sku: &str, unit: &str, amount: &str, at: i64) -> P {
    P { id: id.into(), tenant: "acme".into(), sku: sku.into(), unit: unit.into(), amount: Decimal::from_str(amount).unwrap(), at }
}

/// The rows of a table body, as the page shows them.
fn table(browser: &Browser, id: &str) -> Vec<Vec<String>> {
    let rows = browser.eval(&format!(
        "return [...document.querySelectorAll('#{id} tbody tr')].map(tr => [...tr.cells].map(td => td.textContent));"
    ));
    serde_json::from_value(rows).expect("rows of text")
}

#[test]
fn the_dashboard_draws_usage_totals_and_quotas_and_shows_a_new_pulse_after_a_refresh() {
    let t = Topics::create("dashboard", PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let quotas = dir.path().join("quotas.toml");
    std::fs::write(&quotas, "[[quota]]\ntenant_id = \"acme\"\nproduct_sku = \"storage.standard\"\nuse_unit = \"GB\"\nlimit = \"500\"\nperiod = \"month\"\n").unwrap();
    let cfg = format!("{}\n[serve]\nquotas = {:?}\n", config("1h", "1h"), quotas.display().to_string());
    let base = (now_ms() / 60_000 - 30) * 60_000;
    let (_, key) = create_key(&t, Some("acme"));
    let mut run = Proc::run(&t, &cfg, &[]);
    let (_serve, addr) = start_serve(&t, &cfg);

    // Two minutes of two skus, then a pulse that closes their windows.
    let mut input: Vec<P> = (0..40)
        .flat_map(|i| {
            [p(&format!("s-{i}"), "storage.standard", "GB", &format!("1.{i:02}"), base + i * 3_000),
             p(&format!("c-{i}"), "compute.vcpu", "vcpu-s", &format!("{}.5", i % 4), base + i * 3_000 + 1)]
        })
        .collect();
    input.push(p("push-1", "api.requests", "requests", "1", base + 300_000));
    produce_pulses(&t.source, &input);
    wait_pipeline_done(&t);
    let usage = |query: &str| -> Value {
        client().get(format!("http://{addr}/v1/usage?{query}")).header("X-API-Key", &key).send().unwrap().json().unwrap()
    };
    wait_for("the closed windows in the view", DEADLINE, || (usage("window=inflight")["windows"].as_array()?.len() == 80).then_some(()));

    let browser = Browser::start();
    browser.goto(&format!("http://{addr}/"));
    browser.type_into("#api-key", &key);
    browser.click("#sign-in");
    wait_for("the dashboard's first refresh", DEADLINE, || browser.eval("return document.body.dataset.refreshed || null").as_str().map(str::to_owned));

    // The chart has drawn every window of the finest size as a data point.
    let points = browser.eval(
        "const c = Chart.getChart('usage-chart'); \
         return c ? c.data.datasets.reduce((n, d) => n + d.data.filter(v => v !== null).length, 0) : 0;",
    );
    assert_eq!(points.as_u64(), Some(80), "one point per 1 s window of each sku");
    let drawn = browser.eval("const c = Chart.getChart('usage-chart'); return c.getDatasetMeta(0).data.length;");
    assert!(drawn.as_u64().unwrap_or(0) > 0, "points laid out on the canvas: {drawn}");

    // The totals table equals /v1/usage's totals, digit for digit.
    let api_totals = |answer: &Value| -> Vec<Vec<String>> {
        answer["totals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| vec![t["product_sku"].as_str().unwrap().into(), t["use_unit"].as_str().unwrap().into(),
                          t["total_amount"].as_str().unwrap().into(), t["pulse_count"].to_string()])
            .collect()
    };
    let expected = api_totals(&usage("window=inflight"));
    wait_for("the totals table to equal /v1/usage", DEADLINE, || (table(&browser, "totals") == expected).then_some(()));
    assert_eq!(expected.len(), 2, "{expected:?}");
    let storage_total: Decimal = (0..40).map(|i| Decimal::from_str(&format!("1.{i:02}")).unwrap()).sum();
    assert!(expected.contains(&vec!["storage.standard".into(), "GB".into(), storage_total.to_string(), "40".into()]), "{expected:?}");

    // One quota bar, with the used amount the quota check gives.
    let bars = browser.eval("return [...document.querySelectorAll('#quotas .quota')].map(q => q.querySelector('.used').textContent);");
    let used_this_month: Decimal = input.iter().filter(|x| x.sku == "storage.standard" && x.at >= month_start(now_ms())).map(|x| x.amount).sum();
    assert_eq!(bars, serde_json::json!([used_this_month.to_string()]), "the storage quota's bar");

    // A new pulse (a new sku) appears after a refresh, without reloading the page.
    produce_pulses(&t.source, &[p("new-1", "network.egress", "GB", "0.75", base + 200_000), p("push-2", "api.requests", "requests", "1", base + 400_000)]);
    wait_for("the new sku in the totals table", DEADLINE, || {
        table(&browser, "totals").iter().any(|row| row[0] == "network.egress" && row[2] == "0.75").then_some(())
    });
    wait_for("the new window in the latest aggregates", Duration::from_secs(10), || {
        table(&browser, "latest").iter().any(|row| row[1] == "network.egress").then_some(())
    });

    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(&shot, &png).unwrap();
    println!("dashboard screenshot: {}", shot.display());
    eprintln!("dashboard screenshot: {} ({} bytes)", shot.display(), png.len());
    assert_eq!(run.terminate(Duration::from_secs(30)).code(), Some(0));
}
