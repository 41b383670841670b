//! Re-rating jobs (SPEC §9) against the real stack: `pulses run` and `pulses rate` bill
//! November; a job re-rates it with a changed price book on one of two `pulses serve`
//! replicas while the same job asked of the other is refused; the diff equals the
//! hand-computed difference; applying it issues a credit note on the invoice; the CLI
//! does the same. Money worked out by hand in the comments.

mod common;

use std::process::Command;
use std::str::FromStr;

use common::agg::*;
use common::rating::*;
use common::serve::*;
use common::*;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// 2026-11-01T00:00:00Z.
const NOV: i64 = 1_793_491_200_000;
const DAY: i64 = 86_400_000;

/// The changed prices: storage 0.09 per GB up to 100 then 0.07, requests 0.0012.
const NEW_BOOK: &str = r#"
currency = "USD"
rounding = { scale = 3, mode = "half_even" }

[[prices]]
product_sku = "api.requests"
use_unit = "request"
model = "flat"
unit_price = "0.0012"

[[prices]]
product_sku = "storage"
use_unit = "GB"
model = "graduated"
tiers = [{ up_to = "100", unit_price = "0.09" }, { unit_price = "0.07" }]
"#;

fn p(id: &str, tenant: &str, sku: &str, unit: &str, amount: &str, at: i64) -> P {
    P { id: id.into(), tenant: tenant.into(), sku: sku.into(), unit: unit.into(), amount: Decimal::from_str(amount).unwrap(), at }
}

fn call(method: reqwest::Method, addr: &str, key: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, format!("http://{addr}{path}")).header("X-API-Key", key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().expect("request");
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

/// (tenant, sku, billed quantity, billed amount, re-rated quantity, re-rated amount, difference) of a diff.
fn rows(job: &Value) -> Vec<(String, String, String, String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    job["diff"].as_array().expect("a diff").iter()
        .map(|l| (s(&l["tenant_id"]), s(&l["product_sku"]), s(&l["billed_quantity"]), s(&l["billed_amount"]), s(&l["rerated_quantity"]), s(&l["rerated_amount"]), s(&l["difference"])))
        .collect()
}

fn row(t: &str, sku: &str, q: &str, billed: &str, rerated: &str, diff: &str) -> (String, String, String, String, String, String, String) {
    (t.into(), sku.into(), q.into(), billed.into(), q.into(), rerated.into(), diff.into())
}

#[test]
fn a_rerating_job_diffs_a_changed_price_book_against_what_was_billed_and_applies_as_a_note() {
    let t = Topics::create("rerating", 1);
    let (charges, alerts, invoices) = (format!("{}.charges", t.app), format!("{}.alerts", t.app), format!("{}.invoices", t.app));
    create_topics(&[(&charges, 3), (&alerts, 3)]);
    let cfg = format!("{}\n[topics]\ncharges = {charges:?}\nalerts = {alerts:?}\ninvoices = {invoices:?}\n", config("60d", "2s"));
    let dir = tempfile::tempdir().unwrap();
    let (cfg_path, new_book, bad_book) = (dir.path().join("pulses.toml"), dir.path().join("new.toml"), dir.path().join("bad.toml"));
    std::fs::write(&cfg_path, &cfg).unwrap();
    std::fs::write(&new_book, NEW_BOOK).unwrap();
    std::fs::write(&bad_book, "currency = \"USD\"\n[[prices]]\nmodel = \"flat\"\n").unwrap();
    let _run = Proc::run(&t, &cfg, &[]);
    let _rate = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), Some((&charges, &alerts)));
    produce_pulses(&t.source, &[
        // Billed (BOOK): acme storage 130 GB = 100 × 0.10 + 30 × 0.08 = 12.400; requests 300 = 0.300.
        p("a1", "acme", "storage", "GB", "60", NOV + 2 * DAY),
        p("a2", "acme", "storage", "GB", "70", NOV + 9 * DAY),
        p("a3", "acme", "api.requests", "request", "300", NOV + 3 * DAY),
        // globex: 1234 requests = 1.234.
        p("g1", "globex", "api.requests", "request", "1234", NOV + 14 * DAY),
    ]);
    wait_charged(&charges, "13.934", 4);
    let pulses_cli = |args: &[&str]| {
        let out = Command::new(pulses_bin()).args(args).args(t.flags()).arg("--config").arg(&cfg_path).output().expect("pulses");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, _, err) = pulses_cli(&["invoice", "--period", "2026-11", "--tenant", "acme"]);
    assert_eq!(code, 0, "acme's November invoiced: {err}");
    let (_, admin) = create_key(&t, None);
    let (_, acme_key) = create_key(&t, Some("acme"));
    let (_a, addr_a) = start_serve(&t, &cfg);
    let (_b, addr_b) = start_serve(&t, &cfg);
    let book = new_book.display().to_string();
    let november = json!({"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z", "price_book": book});

    // Bad requests: clear 4xx, no job.
    for (key, body, status, code) in [
        (&admin, json!({"from": "2026-11-02T00:00:00Z", "to": "2026-12-01T00:00:00Z", "price_book": book}), 400, "invalid_parameter"),
        (&admin, json!({"from": "2026-12-01T00:00:00Z", "to": "2026-11-01T00:00:00Z", "price_book": book}), 400, "invalid_parameter"),
        (&admin, json!({"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z", "price_book": bad_book.display().to_string()}), 400, "invalid_price_book"),
        (&admin, json!({"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z", "price_book": "/no/such/book.toml"}), 400, "invalid_price_book"),
        (&acme_key, november.clone(), 403, "forbidden"),
    ] {
        let (got, answer) = call(reqwest::Method::POST, &addr_a, key, "/v1/rerating-jobs", Some(body.clone()));
        assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "{body}: {answer}");
    }

    // The same scope asked of both replicas at once: one job, one refusal naming it.
    let asks: Vec<_> = [addr_a.clone(), addr_b.clone()].into_iter().map(|addr| {
        let (key, body) = (admin.clone(), november.clone());
        std::thread::spawn(move || call(reqwest::Method::POST, &addr, &key, "/v1/rerating-jobs", Some(body)))
    }).collect();
    let mut answers: Vec<(u16, Value)> = asks.into_iter().map(|h| h.join().unwrap()).collect();
    answers.sort_by_key(|(s, _)| *s);
    let [(202, job), (409, refused)] = &answers[..] else { panic!("expected one 202 and one 409: {answers:?}") };
    assert_eq!((refused["error"].as_str(), &refused["job_id"]), (Some("rerating_in_progress"), &job["job_id"]), "{refused}");
    let id = job["job_id"].as_str().unwrap().to_owned();
    // One tenant's November overlaps it too; December does not.
    let (status, _) = call(reqwest::Method::POST, &addr_b, &admin, "/v1/rerating-jobs",
        Some(json!({"from": "2026-11-01T00:00:00Z", "to": "2027-01-01T00:00:00Z", "tenant_id": "globex", "price_book": book})));
    assert_eq!(status, 409);
    let (status, december) = call(reqwest::Method::POST, &addr_b, &admin, "/v1/rerating-jobs",
        Some(json!({"from": "2026-12-01T00:00:00Z", "to": "2027-01-01T00:00:00Z", "tenant_id": "globex", "price_book": book})));
    assert_eq!(status, 202, "{december}");

    let done = wait_for("the job done", DEADLINE, || {
        let (_, j) = call(reqwest::Method::GET, &addr_b, &admin, &format!("/v1/rerating-jobs/{id}"), None);
        assert_ne!(j["status"].as_str(), Some("failed"), "{j}");
        (j["status"].as_str() == Some("done")).then_some(j)
    });
    // Re-rated (NEW_BOOK): acme storage 100 × 0.09 + 30 × 0.07 = 11.100 (1.300 less);
    // requests 300 × 0.0012 = 0.360 (0.060 more); globex 1234 × 0.0012 = 1.4808 → 1.481 (0.247 more).
    assert_eq!(rows(&done), vec![
        row("acme", "api.requests", "300", "0.300", "0.360", "0.060"),
        row("acme", "storage", "130", "12.400", "11.100", "-1.300"),
        row("globex", "api.requests", "1234", "1.234", "1.481", "0.247"),
    ]);
    assert_eq!(done["difference"].as_str(), Some("-0.993"));
    // Into its own topics; the live charges are as they were.
    let own: Decimal = read_all(done["charges_topic"].as_str().unwrap()).iter().map(|r| d(r.json()["amount"].as_str().unwrap())).sum();
    assert_eq!(own, d("12.941"));
    wait_charged(&charges, "13.934", 4);

    // Applying is explicit: a credit note of 0.060 − 1.300 = −1.240 on acme's invoice;
    // globex has no November invoice yet.
    let (status, applied) = call(reqwest::Method::POST, &addr_a, &admin, &format!("/v1/rerating-jobs/{id}/apply"), None);
    assert_eq!(status, 200, "{applied}");
    assert_eq!((applied["status"].as_str(), &applied["not_invoiced"]), (Some("applied"), &json!(["globex|2026-11"])));
    let docs: Vec<Value> = read_all(&invoices).iter().map(|r| r.json()).collect();
    let note = docs.iter().find(|d| d["rerating_job"] == json!(id)).expect("the note");
    let invoice = docs.iter().find(|d| d["kind"] == "invoice").expect("the invoice");
    assert_eq!((note["kind"].as_str(), note["total"].as_str(), &note["adjusts"]), (Some("credit_note"), Some("-1.240"), &invoice["invoice_id"]));
    assert_eq!(applied["notes"], json!([note["invoice_id"]]));
    assert_eq!((note["issuer"].clone(), note["number"].as_u64()), (invoice["issuer"].clone(), Some(invoice["number"].as_u64().unwrap() + 1)));
    let (status, again) = call(reqwest::Method::POST, &addr_b, &admin, &format!("/v1/rerating-jobs/{id}/apply"), None);
    assert_eq!((status, again["error"].as_str()), (409, Some("already_applied")));
    assert_eq!(read_all(&invoices).len(), 2, "applied once");
    // The charge-driven adjustments do not undo the note: nothing pending for acme.
    let (code, out, _) = pulses_cli(&["invoice", "--period", "2026-11", "--tenant", "acme"]);
    assert_eq!(code, 0);
    assert!(out.contains("already_issued") && !out.contains("pending"), "{out}");

    // The CLI: the same job for acme alone, run in the foreground.
    let (code, out, err) = pulses_cli(&["rerate", "--from", "2026-11-01T00:00:00Z", "--to", "2026-12-01T00:00:00Z", "--tenant", "acme", "--price-book", &book]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("diff\tacme\t2026-11\tstorage\tGB\tbilled 130 for 12.400\trerated 130 for 11.100\tdifference -1.300 USD"), "{out}");
    assert!(!out.contains("globex"), "{out}");
    let (code, out, _) = pulses_cli(&["rerate", "--status", &id]);
    assert_eq!(code, 0);
    assert!(out.starts_with(&format!("job\t{id}\tApplied")), "{out}");
    // The log holds the three accepted jobs only: bad requests and refusals wrote nothing.
    let logged: std::collections::BTreeSet<String> = read_all(&format!("{}.rerating-jobs", t.app)).iter()
        .map(|r| r.json()["job_id"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(logged.len(), 3, "{logged:?}");
    assert!(logged.contains(&id) && logged.contains(december["job_id"].as_str().unwrap()));
}
