//! `GET /v1/usage` and `POST /v1/quota/check` of `pulses serve`, answered from its
//! view of the aggregates `pulses run` writes (SPEC §8): exact latest revisions and
//! totals against an independent fold, corrections within a second, quotas over a
//! UTC day boundary, tenant isolation, and a view that resumes after kill -9.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::agg::*;
use common::serve::*;
use common::*;
use rust_decimal::Decimal;
use serde_json::{json, Value};

fn get_usage(addr: &str, key: &str, query: &str) -> (u16, Value) {
    let res = client().get(format!("http://{addr}/v1/usage?{query}")).header("X-API-Key", key).send().expect("GET /v1/usage");
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

fn quota_check(addr: &str, key: &str, body: Value) -> (u16, Value) {
    let res = client().post(format!("http://{addr}/v1/quota/check")).header("X-API-Key", key).json(&body).send().expect("POST /v1/quota/check");
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

fn dec(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().unwrap_or_else(|| panic!("a decimal string: {v}"))).unwrap()
}

fn p(id: &str, tenant: &str, sku: &str, unit: &str, amount: &str, at: i64) -> P {
    P { id: id.into(), tenant: tenant.into(), sku: sku.into(), unit: unit.into(), amount: Decimal::from_str(amount).unwrap(), at }
}

/// The windows of one tenant and window size in a usage answer, keyed like the fold,
/// with their revisions.
fn answered(usage: &Value) -> BTreeMap<AggKey, (u64, Expect)> {
    usage["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .map(|w| {
            let (k, e) = aggregate_of(w);
            (k, (w["revision"].as_u64().unwrap(), e))
        })
        .collect()
}

#[test]
fn usage_is_the_latest_revision_of_every_window_and_a_correction_replaces_it_within_a_second() {
    let t = Topics::create("usage", PARTITIONS);
    let cfg = config("1h", "1h");
    let base = (now_ms() / 60_000 - 40) * 60_000;
    let (_, acme_key) = create_key(&t, Some("acme"));
    let (_, globex_key) = create_key(&t, Some("globex"));
    let mut run = Proc::run(&t, &cfg, &[]);
    let (serve, addr) = start_serve(&t, &cfg);

    // Two tenants, two skus, three minutes; then late pulses that correct closed windows.
    let mut input: Vec<P> = Vec::new();
    for i in 0..360i64 {
        for (tenant, n) in [("acme", 1), ("globex", 2)] {
            let (sku, unit) = if i % 2 == 0 { ("storage.standard", "GB") } else { ("compute.vcpu", "vcpu-s") };
            input.push(p(&format!("{tenant}-{i}"), tenant, sku, unit, &format!("{}.{:03}", i % 7 + n, i % 1000), base + i * 500));
        }
    }
    let push: Vec<P> = ["acme", "globex"].iter().map(|t| p(&format!("push-{t}"), t, "storage.standard", "GB", "1", base + 600_000)).collect();
    produce_pulses(&t.source, &input);
    produce_pulses(&t.source, &push);
    let late: Vec<P> = (0..6).map(|i| p(&format!("late-{i}"), "acme", "storage.standard", "GB", "0.125", base + 20_000 * i + 7)).collect();
    wait_pipeline_done(&t);
    produce_pulses(&t.source, &late);
    wait_pipeline_done(&t);

    let counted: Vec<P> = input.iter().chain(&push).chain(&late).cloned().collect();
    let expected = fold(&counted, WINDOWS, base + 600_000 - 5_000);
    let expect_of = |tenant: &str, window: &str| -> BTreeMap<AggKey, Expect> {
        expected.iter().filter(|(k, _)| k.0 == tenant && k.3 == window).map(|(k, e)| (k.clone(), e.clone())).collect()
    };
    let (finals, _) = latest_finals(&t.aggregated);
    for (tenant, key) in [("acme", &acme_key), ("globex", &globex_key)] {
        for (window, _) in WINDOWS {
            let want = expect_of(tenant, window);
            let usage = wait_until(&format!("{tenant}'s {window} usage"), DEADLINE, || {
                let (status, usage) = get_usage(&addr, key, &format!("window={window}"));
                // Final aggregates only by default: the push pulses' windows are still open.
                let got: BTreeMap<AggKey, Expect> = answered(&usage).into_iter().map(|(k, (_, e))| (k, e)).collect();
                if status == 200 && got == want { Ok(usage) } else { Err(format!("{status}: {} of {} windows match", got.len(), want.len())) }
            });
            // The latest revision of each, as the topic has it.
            for (k, (revision, _)) in answered(&usage) {
                if let Some((latest, _)) = finals.get(&k) {
                    assert_eq!(revision, u64::from(*latest), "{k:?}: the latest revision");
                }
            }
            // Totals: exact sums by sku and unit over the windows answered.
            let mut sums: BTreeMap<(String, String), (Decimal, u64)> = BTreeMap::new();
            for w in usage["windows"].as_array().unwrap() {
                let s = sums.entry((w["product_sku"].as_str().unwrap().into(), w["use_unit"].as_str().unwrap().into())).or_default();
                s.0 += dec(&w["total_amount"]);
                s.1 += w["pulse_count"].as_u64().unwrap();
            }
            let totals: BTreeMap<(String, String), (Decimal, u64)> = usage["totals"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| ((t["product_sku"].as_str().unwrap().into(), t["use_unit"].as_str().unwrap().into()), (dec(&t["total_amount"]), t["pulse_count"].as_u64().unwrap())))
                .collect();
            assert_eq!(totals, sums, "{tenant} {window}: totals");
            assert!(usage["as_of"]["lag"].as_i64().is_some() && usage["as_of"]["updated_at"].as_str().is_some(), "{usage}");
        }
    }
    let corrected = finals.values().filter(|(r, _)| *r > 0).count();
    assert!(corrected > 0, "the late pulses corrected windows");

    // Filters: one sku, a time range (windows whose start is in [from, to)).
    let from = rfc3339(base + 60_000);
    let to = rfc3339(base + 120_000);
    let (_, usage) = get_usage(&addr, &acme_key, &format!("window=inflight&product_sku=compute.vcpu&from={from}&to={to}"));
    let got = answered(&usage);
    let want: Vec<AggKey> =
        expect_of("acme", "inflight").into_keys().filter(|k| k.1 == "compute.vcpu" && (base + 60_000..base + 120_000).contains(&k.4)).collect();
    assert!(!want.is_empty());
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), want, "only compute.vcpu windows starting in [from, to)");
    let starts: Vec<i64> = got.keys().map(|k| k.4).collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "ordered by start");

    // Tenant isolation.
    let (status, answer) = get_usage(&addr, &acme_key, "tenant_id=globex&window=minute");
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden_tenant")));
    let (status, _) = get_usage(&addr, "pk_nope", "window=minute");
    assert_eq!(status, 401);

    // A correction is in the view within a second of being committed: measured from
    // its emitted_at (stage 2's clock when it emitted it, before the commit) to the
    // first answer that holds it, polled every 20 ms.
    let key = ("acme".to_owned(), "storage.standard".to_owned(), "GB".to_owned(), "minute".to_owned(), base);
    let before = finals[&key].0;
    produce_pulses(&t.source, &[p("late-again", "acme", "storage.standard", "GB", "0.5", base + 11)]);
    let started = Instant::now();
    let (seen_at, emitted_at) = loop {
        let (_, usage) = get_usage(&addr, &acme_key, "window=minute");
        let w = usage["windows"].as_array().unwrap().iter().find(|w| aggregate_of(w).0 == key).cloned().unwrap();
        if w["revision"].as_u64() == Some(u64::from(before) + 1) {
            let emitted = chrono::DateTime::parse_from_rfc3339(w["emitted_at"].as_str().unwrap()).unwrap().timestamp_millis();
            break (now_ms(), emitted);
        }
        assert!(started.elapsed() < DEADLINE, "the correction never reached /v1/usage");
        std::thread::sleep(Duration::from_millis(20));
    };
    let delay = seen_at - emitted_at;
    eprintln!("correction visible in /v1/usage {delay} ms after stage 2 emitted it");
    assert!(delay < 1_000, "a correction replaces the earlier value within 1 s of its commit ({delay} ms after emission)");

    // kill -9 and restart on the same state: the view resumes from its stored
    // positions (reads fewer records than the topic holds) and answers the same.
    let (_, before_kill) = get_usage(&addr, &acme_key, "window=minute");
    let topic_records = read_uncommitted(&t.aggregated).len() as f64;
    let state = serve.into_state();
    let restarted = Proc::start("serve", &t, &cfg, &[], state);
    let addr = restarted.wait_ready();
    let (_, after) = get_usage(&addr, &acme_key, "window=minute");
    assert_eq!(after["windows"], before_kill["windows"]);
    assert_eq!(after["totals"], before_kill["totals"]);
    let read = common::http::scrape(&addr)["pulses_view_records_read_total"];
    eprintln!("restarted view read {read} of {topic_records} aggregate records");
    assert!(read < topic_records, "the view resumed from its stored positions ({read} of {topic_records} read)");
    assert_eq!(run.terminate(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn quota_checks_sum_the_current_utc_period_exactly_across_a_day_boundary() {
    // The workload straddles today's UTC midnight; just after midnight it waits a few
    // minutes so no pulse is in the future.
    let midnight = day_start(now_ms());
    if now_ms() < midnight + 300_000 {
        std::thread::sleep(Duration::from_millis((midnight + 300_000 - now_ms()) as u64));
    }
    let t = Topics::create("quota", PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let quotas = dir.path().join("quotas.toml");
    std::fs::write(&quotas, r#"
[[quota]]
tenant_id = "acme"
product_sku = "storage.standard"
use_unit = "GB"
limit = "100.5"
period = "day"

[[quota]]
tenant_id = "*"
product_sku = "storage.standard"
use_unit = "GB"
limit = "1"
period = "day"

[[quota]]
tenant_id = "*"
product_sku = "compute.vcpu"
use_unit = "vcpu-s"
limit = "1000000"
period = "month"
"#).unwrap();
    let cfg = format!("{}\n[serve]\nquotas = {:?}\n", config("1h", "1h"), quotas.display().to_string());
    let (_, acme) = create_key(&t, Some("acme"));
    let (_, globex) = create_key(&t, Some("globex"));
    let mut run = Proc::run(&t, &cfg, &[]);
    let (_serve, addr) = start_serve(&t, &cfg);

    // Two minutes either side of midnight, every 2 s, amounts as Java's BigDecimal writes them.
    let mut input = Vec::new();
    for i in 0..120i64 {
        let at = midnight - 120_000 + i * 2_000 + 13;
        input.push(p(&format!("s-{i}"), "acme", "storage.standard", "GB", &format!("0.{:03}", 100 + i), at));
        input.push(p(&format!("c-{i}"), "acme", "compute.vcpu", "vcpu-s", &format!("{}.5", i % 9), at + 1));
    }
    let push = vec![p("push", "acme", "api.requests", "requests", "1", midnight + 600_000)];
    produce_pulses(&t.source, &input);
    produce_pulses(&t.source, &push);
    wait_pipeline_done(&t);
    wait_for("the inflight windows in the view", DEADLINE, || {
        let (_, usage) = get_usage(&addr, &acme, "window=inflight&product_sku=compute.vcpu");
        (usage["windows"].as_array().map_or(0, |w| w.len()) == input.len() / 2).then_some(())
    });

    let now = now_ms();
    let sum = |sku: &str, from: i64| input.iter().filter(|p| p.sku == sku && p.at >= from && p.at <= now).map(|p| p.amount).sum::<Decimal>();
    let day_used = sum("storage.standard", day_start(now));
    let month_used = sum("compute.vcpu", month_start(now));
    assert!(day_used > Decimal::ZERO && day_used < sum("storage.standard", 0), "the day quota counts only today's pulses");

    let check = |key: &str, body: Value| {
        let (status, answer) = quota_check(&addr, key, body);
        assert_eq!(status, 200, "{answer}");
        answer
    };
    let d = |s: &str| Decimal::from_str(s).unwrap();
    let a = check(&acme, json!({"product_sku": "storage.standard", "use_unit": "GB", "requested": "10"}));
    assert_eq!(dec(&a["used"]), day_used, "{a}");
    assert_eq!((dec(&a["limit"]), dec(&a["remaining"])), (d("100.5"), d("100.5") - day_used));
    assert_eq!((a["allowed"].as_bool(), a["period"].as_str()), (Some(true), Some("day")));
    assert_eq!(a["period_start"].as_str().map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()), Some(day_start(now)));
    let over = (d("100.5") - day_used + d("0.001")).to_string();
    let refused = check(&acme, json!({"tenant_id": "acme", "product_sku": "storage.standard", "use_unit": "GB", "requested": over}));
    assert_eq!(refused["allowed"].as_bool(), Some(false), "used + requested > limit: {refused}");
    let exactly = (d("100.5") - day_used).to_string();
    assert_eq!(check(&acme, json!({"product_sku": "storage.standard", "use_unit": "GB", "requested": exactly}))["allowed"], true);

    let m = check(&acme, json!({"product_sku": "compute.vcpu", "use_unit": "vcpu-s", "requested": 2.5}));
    assert_eq!((dec(&m["used"]), m["period"].as_str()), (month_used, Some("month")), "{m}");

    // The wildcard applies to a tenant without its own entry; no quota: allowed, no limit.
    let g = check(&globex, json!({"product_sku": "storage.standard", "use_unit": "GB", "requested": "1"}));
    assert_eq!((g["allowed"].as_bool(), dec(&g["used"]), dec(&g["limit"])), (Some(true), Decimal::ZERO, d("1")));
    let none = check(&acme, json!({"product_sku": "api.requests", "use_unit": "requests", "requested": "1000000"}));
    assert_eq!((none["allowed"].as_bool(), &none["limit"], &none["remaining"]), (Some(true), &Value::Null, &Value::Null), "{none}");

    // Isolation and bad bodies.
    let (status, answer) = quota_check(&addr, &globex, json!({"tenant_id": "acme", "product_sku": "storage.standard", "use_unit": "GB", "requested": "1"}));
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden_tenant")));
    let (status, answer) = quota_check(&addr, &acme, json!({"product_sku": "storage.standard", "use_unit": "GB", "requested": "-1"}));
    assert_eq!((status, answer["error"].as_str()), (400, Some("invalid_requested")));

    // The file changes: the new limit applies without a restart.
    std::fs::write(&quotas, "[[quota]]\ntenant_id = \"acme\"\nproduct_sku = \"storage.standard\"\nuse_unit = \"GB\"\nlimit = \"7\"\nperiod = \"month\"\n").unwrap();
    wait_for("the reloaded quota", DEADLINE, || {
        let a = check(&acme, json!({"product_sku": "storage.standard", "use_unit": "GB", "requested": "0"}));
        (a["limit"] == "7" && a["period"] == "month").then_some(())
    });
    assert_eq!(run.terminate(Duration::from_secs(30)).code(), Some(0));
}
