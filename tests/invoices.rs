//! Invoices (SPEC §9) against the real stack: `pulses run` aggregates November's pulses,
//! `pulses rate` charges them, and invoices are issued by `pulses invoice` and by
//! `POST /v1/invoices` on two `pulses serve` replicas at once. Expected money is
//! worked out by hand in the comments (tests/common/rating.rs BOOK: requests at 0.001,
//! storage 0.10 per GB up to 100 then 0.08, rounded to 3 places).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::str::FromStr;

use common::agg::*;
use common::browser::Browser;
use common::rating::*;
use common::serve::*;
use common::*;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// 2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z.
const NOV: i64 = 1_793_491_200_000;
const DEC: i64 = 1_796_083_200_000;
const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

fn p(id: &str, tenant: &str, sku: &str, unit: &str, amount: &str, at: i64) -> P {
    P { id: id.into(), tenant: tenant.into(), sku: sku.into(), unit: unit.into(), amount: Decimal::from_str(amount).unwrap(), at }
}

/// The config of one test: its own charges, alerts and invoices topics; closed windows
/// kept 60 days, so a November pulse arriving in December still corrects its window.
fn setup(name: &str) -> (Topics, String, String, String) {
    let t = Topics::create(name, 1);
    let (charges, alerts, invoices) = (format!("{}.charges", t.app), format!("{}.alerts", t.app), format!("{}.invoices", t.app));
    create_topics(&[(&charges, 3), (&alerts, 3)]);
    let cfg = format!("{}\n[topics]\ncharges = {charges:?}\nalerts = {alerts:?}\ninvoices = {invoices:?}\n", config("60d", "2s"));
    (t, cfg, charges, invoices)
}

/// `pulses invoice <args>` for `t`: (exit code, stdout, stderr).
fn invoice_cli(t: &Topics, cfg: &str, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pulses.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = Command::new(pulses_bin()).arg("invoice").args(t.flags()).arg("--config").arg(&path).args(args).output().expect("run pulses invoice");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn post_invoice(addr: &str, key: &str, body: Value) -> (u16, Value) {
    let res = client().post(format!("http://{addr}/v1/invoices")).header("X-API-Key", key).json(&body).send().expect("POST");
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

fn get(addr: &str, key: &str, path: &str) -> (u16, Value) {
    let res = client().get(format!("http://{addr}{path}")).header("X-API-Key", key).send().expect("GET");
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

/// (sku, unit, quantity, amount) of a document's lines.
fn lines(doc: &Value) -> Vec<(String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    doc["lines"].as_array().expect("lines").iter().map(|l| (s(&l["product_sku"]), s(&l["use_unit"]), s(&l["quantity"]), s(&l["amount"]))).collect()
}

fn line(sku: &str, unit: &str, quantity: &str, amount: &str) -> (String, String, String, String) {
    (sku.into(), unit.into(), quantity.into(), amount.into())
}

/// Every document in the invoices topic, by key.
fn documents(topic: &str) -> BTreeMap<String, Value> {
    read_all(topic).iter().map(|r| (r.key_str(), r.json())).collect()
}

/// Each issuer's numbers are 1..=n, none twice.
fn assert_gap_free(docs: &[Value]) {
    let mut by_issuer: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for d in docs {
        by_issuer.entry(d["issuer"].as_str().unwrap().to_owned()).or_default().push(d["number"].as_u64().unwrap());
    }
    for (issuer, mut numbers) in by_issuer {
        numbers.sort();
        assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>(), "issuer {issuer}'s numbers");
    }
}

#[test]
fn invoices_are_issued_once_from_the_period_charges_and_corrections_become_adjustments() {
    let (t, cfg, charges, invoices) = setup("invoices");
    let _run = Proc::run(&t, &cfg, &[]);
    let _rate = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), Some((&charges, &format!("{}.alerts", t.app))));
    produce_pulses(&t.source, &[
        // acme storage: 60 + 70 = 130 GB: 100 × 0.10 + 30 × 0.08 = 12.400.
        p("a1", "acme", "storage", "GB", "60", NOV + 2 * DAY + 10 * HOUR),
        p("a2", "acme", "api.requests", "request", "250", NOV + 2 * DAY + 10 * HOUR + 10_000),
        p("a3", "acme", "storage", "GB", "70", NOV + 9 * DAY + 12 * HOUR),
        // acme requests: 250 + 50 = 300 × 0.001 = 0.300. acme's November: 12.700.
        p("a4", "acme", "api.requests", "request", "50", NOV + 19 * DAY + 8 * HOUR),
        // globex: 1234 requests = 1.234.
        p("g1", "globex", "api.requests", "request", "1234", NOV + 14 * DAY),
        // December is another period: 5 GB = 0.500, on no November invoice.
        p("a5", "acme", "storage", "GB", "5", DEC + 600_000),
    ]);
    // 12.700 + 1.234 + 0.500, one charge per final minute window.
    wait_charged(&charges, "14.434", 6);
    let (_, admin) = create_key(&t, None);
    let (_, acme_key) = create_key(&t, Some("acme"));
    let (_a, addr_a) = start_serve(&t, &cfg);
    let (_b, addr_b) = start_serve(&t, &cfg);

    // Bad requests: clear 4xx, nothing written.
    for (key, body, status, code) in [
        (&admin, json!({"period": "2026-13", "tenant_id": "acme"}), 400, "invalid_parameter"),
        (&admin, json!({"period": "November", "tenant_id": "acme"}), 400, "invalid_parameter"),
        (&admin, json!({"tenant_id": "acme"}), 400, "invalid_body"),
        (&acme_key, json!({"period": "2026-11", "tenant_id": "globex"}), 403, "forbidden_tenant"),
        (&admin, json!({"period": "2026-11", "tenant_id": "bad tenant"}), 400, "invalid_parameter"),
    ] {
        let (got, answer) = post_invoice(&addr_a, key, body.clone());
        assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "{body}: {answer}");
    }
    // December is not over: its windows are still open.
    let (status, open) = post_invoice(&addr_a, &admin, json!({"period": "2026-12", "tenant_id": "acme"}));
    assert_eq!((status, open["error"].as_str()), (409, Some("period_open")), "{open}");
    assert!(open["detail"].as_str().unwrap_or_default().contains("windows still open"), "{open}");
    let (code, _, err) = invoice_cli(&t, &cfg, &["--period", "2026-12", "--tenant", "acme"]);
    assert_eq!(code, 2, "an open period exits 2: {err}");
    assert!(documents(&invoices).is_empty(), "nothing issued yet");

    // The same invoice asked of two replicas at once: one issues it, the other is told it exists.
    let asks: Vec<_> = [addr_a.clone(), addr_b.clone()]
        .into_iter()
        .map(|addr| {
            let key = admin.clone();
            std::thread::spawn(move || post_invoice(&addr, &key, json!({"period": "2026-11", "tenant_id": "acme"})))
        })
        .collect();
    let mut answers: Vec<(u16, Value)> = asks.into_iter().map(|h| h.join().unwrap()).collect();
    answers.sort_by_key(|(s, _)| *s);
    let [(201, issued), (409, refused)] = &answers[..] else { panic!("expected one 201 and one 409: {answers:?}") };
    assert_eq!(refused["error"].as_str(), Some("invoice_already_exists"), "{refused}");
    assert_eq!(refused["invoice_id"], issued["invoice_id"]);
    assert_eq!(lines(issued), vec![line("api.requests", "request", "300", "0.300"), line("storage", "GB", "130", "12.400")]);
    let tiers: Vec<(u64, &str, &str)> = issued["lines"][1]["tiers"].as_array().unwrap().iter()
        .map(|t| (t["tier"].as_u64().unwrap(), t["quantity"].as_str().unwrap(), t["unit_price"].as_str().unwrap())).collect();
    assert_eq!(tiers, vec![(1, "100", "0.10"), (2, "30", "0.08")]);
    assert_eq!((issued["subtotal"].as_str(), issued["total"].as_str(), issued["currency"].as_str()), (Some("12.700"), Some("12.700"), Some("USD")));
    assert_eq!((issued["kind"].as_str(), issued["period"].as_str(), issued["charges"]["count"].as_u64()), (Some("invoice"), Some("2026-11"), Some(4)));
    assert_eq!((issued["period_start"].as_str(), issued["period_end"].as_str()), (Some("2026-11-01T00:00:00.000Z"), Some("2026-12-01T00:00:00.000Z")));

    // The CLI over every tenant: globex issued now, acme before.
    let (code, out, err) = invoice_cli(&t, &cfg, &["--period", "2026-11"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.lines().any(|l| l.starts_with("acme\talready_issued")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("globex\tissued\tinvoice") && l.contains(" 1.234 USD")), "{out}");
    let docs = documents(&invoices);
    assert_eq!(docs.keys().cloned().collect::<Vec<_>>(), vec!["acme|2026-11".to_owned(), "globex|2026-11".to_owned()]);
    assert_eq!(&docs["acme|2026-11"], issued, "the record is the answer");
    assert_eq!(docs["globex|2026-11"]["total"].as_str(), Some("1.234"));
    assert_gap_free(&docs.values().cloned().collect::<Vec<_>>());
    // Invoice and ledger agree: the invoices' totals are the November charges' sum.
    let november: Decimal = read_all(&charges).iter().map(|r| r.json()).filter(|c| c["period"] == "2026-11")
        .map(|c| d(c["amount"].as_str().unwrap())).sum();
    assert_eq!(november, d("12.700") + d("1.234"));

    // A late November pulse after the invoice: 30 GB more in a closed window. 130 → 160 GB
    // costs 10 + 60 × 0.08 = 14.800, 2.400 more; the invoice stays as issued.
    produce_pulses(&t.source, &[p("a6", "acme", "storage", "GB", "30", NOV + 9 * DAY + 12 * HOUR + 20_000)]);
    wait_charged(&charges, "16.834", 7);
    let (code, out, err) = invoice_cli(&t, &cfg, &["--period", "2026-11", "--tenant", "acme"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("adjustment pending: 2.400"), "{out}");
    assert_eq!(documents(&invoices).len(), 2, "no adjustment without --adjustments");
    let (code, out, err) = invoice_cli(&t, &cfg, &["--period", "2026-11", "--adjustments"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let docs = documents(&invoices);
    assert_eq!(&docs["acme|2026-11"], issued, "the issued invoice never changes");
    let debit = &docs["acme|2026-11|adjustment|1"];
    assert_eq!((debit["kind"].as_str(), debit["adjusts"].as_str()), (Some("debit_note"), issued["invoice_id"].as_str()));
    assert_eq!(lines(debit), vec![line("storage", "GB", "30", "2.400")]);
    assert_eq!((debit["billed_before"].as_str(), debit["lines"][0]["billed_before"]["amount"].as_str()), (None, Some("12.400")));
    assert_eq!((debit["total"].as_str(), debit["charges"]["count"].as_u64()), (Some("2.400"), Some(1)));
    assert_eq!(docs.len(), 3, "globex had no correction");
    assert_gap_free(&docs.values().cloned().collect::<Vec<_>>());
    // Again: nothing left to adjust.
    let (code, out, _) = invoice_cli(&t, &cfg, &["--period", "2026-11", "--adjustments"]);
    assert_eq!((code, documents(&invoices).len()), (0, 3), "{out}");

    // Served back from the invoices view.
    let listed = wait_for("both of acme's documents in the view", DEADLINE, || {
        let (_, l) = get(&addr_b, &admin, "/v1/invoices?tenant_id=acme&period=2026-11");
        (l["invoices"].as_array()?.len() == 2).then_some(l)
    });
    assert_eq!(listed["invoices"][0], *issued);
    assert_eq!(listed["invoices"][1], *debit);
    let id = issued["invoice_id"].as_str().unwrap();
    assert_eq!(get(&addr_b, &acme_key, &format!("/v1/invoices/{id}")), (200, issued.clone()));
    let globex_id = docs["globex|2026-11"]["invoice_id"].as_str().unwrap();
    assert_eq!(get(&addr_b, &acme_key, &format!("/v1/invoices/{globex_id}")).0, 404, "another tenant's invoice");
    let (status, own) = get(&addr_b, &acme_key, "/v1/invoices");
    assert_eq!((status, own["invoices"].as_array().map(Vec::len)), (200, Some(2)));
    let (status, bad) = get(&addr_b, &admin, "/v1/invoices?tenant_id=acme&period=11-2026");
    assert_eq!((status, bad["error"].as_str()), (400, Some("invalid_parameter")));

    // The printable page, in a real browser, from the dashboard's invoice list.
    let browser = Browser::start();
    browser.goto(&format!("http://{addr_a}/"));
    browser.type_into("#api-key", &acme_key);
    browser.click("#sign-in");
    wait_for("the dashboard's invoice list", DEADLINE, || {
        (browser.eval("return document.querySelectorAll('#invoices tbody tr').length").as_u64() == Some(2)).then_some(())
    });
    browser.click(".open-invoice");
    let page = wait_for("the invoice page in its frame", DEADLINE, || {
        let v = browser.eval(
            "const d = document.getElementById('invoice-frame').contentDocument; \
             const t = d && d.getElementById('total'); \
             return t ? { number: d.getElementById('number').textContent, total: t.textContent, \
                          tenant: d.getElementById('tenant').textContent, lines: d.querySelectorAll('tr.line').length, \
                          amounts: [...d.querySelectorAll('td.amount')].map(x => x.textContent) } : null;",
        );
        (!v.is_null()).then_some(v)
    });
    let number = format!("{}-{:06}", issued["issuer"].as_str().unwrap(), issued["number"].as_u64().unwrap());
    assert_eq!(page, json!({"number": number, "total": "12.700", "tenant": "acme", "lines": 2, "amounts": ["0.300", "12.400"]}));
    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("invoice.png");
    std::fs::write(&shot, browser.screenshot()).unwrap();
    println!("invoice page screenshot: {}", shot.display());
}

#[test]
fn a_run_killed_mid_way_issues_every_invoice_once_after_a_restart() {
    let (t, cfg, charges, invoices) = setup("invoices-kill");
    let _run = Proc::run(&t, &cfg, &[]);
    let _rate = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), Some((&charges, &format!("{}.alerts", t.app))));
    const TENANTS: usize = 3_000;
    // Tenant i uses i + 1 requests in November: (i + 1) × 0.001.
    let pulses: Vec<P> = (0..TENANTS).map(|i| p(&format!("k{i}"), &format!("t{i:04}"), "api.requests", "request", &(i + 1).to_string(), NOV + i as i64 * 60_000)).collect();
    produce_pulses(&t.source, &pulses);
    let total: Decimal = (1..=TENANTS as i64).map(|n| Decimal::new(n, 3)).sum();
    wait_charged(&charges, &total.to_string(), TENANTS);

    // Start a run over every tenant and SIGKILL it once its first documents are written.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pulses.toml");
    std::fs::write(&path, &cfg).unwrap();
    let mut first = Command::new(pulses_bin()).arg("invoice").args(t.flags()).arg("--config").arg(&path).args(["--period", "2026-11"])
        .stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let watch: rdkafka::consumer::BaseConsumer = kafka_client().set("isolation.level", "read_uncommitted").create().unwrap();
    // Polled every few ms (wait_for's 200 ms steps could miss the run's whole issuing).
    let started = std::time::Instant::now();
    while written(&watch, &invoices) == 0 {
        assert!(started.elapsed() < DEADLINE, "the first run wrote nothing");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let still_running = first.try_wait().unwrap().is_none();
    first.kill().unwrap();
    first.wait().unwrap();
    let before = documents(&invoices).len();
    println!("killed {} with {before} of {TENANTS} invoices committed", if still_running { "mid-run" } else { "after it ended" });
    assert!(still_running && before < TENANTS, "the run was killed before it finished ({before} committed)");

    let (code, out, err) = invoice_cli(&t, &cfg, &["--period", "2026-11"]);
    assert_eq!(code, 0, "{err}");
    let issued_now = out.lines().filter(|l| l.contains("\tissued\t")).count();
    let issued_before = out.lines().filter(|l| l.contains("\talready_issued\t")).count();
    assert_eq!((issued_now + issued_before, issued_before), (TENANTS, before), "{err}");
    let docs = documents(&invoices);
    assert_eq!(docs.len(), TENANTS, "one invoice per tenant");
    let records = read_all(&invoices);
    assert_eq!(records.len(), TENANTS, "no invoice written twice (committed records, before compaction)");
    let values: Vec<Value> = docs.values().cloned().collect();
    assert_gap_free(&values);
    for (i, doc) in values.iter().enumerate() {
        let tenant = doc["tenant_id"].as_str().unwrap();
        assert_eq!(tenant, format!("t{i:04}"));
        assert_eq!(d(doc["total"].as_str().unwrap()), Decimal::new(i as i64 + 1, 3), "{tenant}");
    }
    let ids: BTreeSet<&str> = values.iter().map(|d| d["invoice_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), TENANTS);
}

/// Offsets written to `topic`'s three partitions (committed or not; 0 before it exists).
fn written(watch: &rdkafka::consumer::BaseConsumer, topic: &str) -> i64 {
    use rdkafka::consumer::Consumer;
    (0..3).map(|p| watch.fetch_watermarks(topic, p, std::time::Duration::from_secs(1)).map_or(0, |(_, high)| high)).sum()
}

#[test]
fn partitions_added_to_the_invoices_topic_stop_the_issuers_instead_of_invoicing_twice() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    let (t, cfg, charges, invoices) = setup("invoices-grown");
    let _run = Proc::run(&t, &cfg, &[]);
    let _rate = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), Some((&charges, &format!("{}.alerts", t.app))));
    // 40 tenants, 1 request each: spread over the 3 partitions of the invoices topic.
    produce_pulses(&t.source, &(0..40).map(|i| p(&format!("n{i}"), &format!("n{i:02}"), "api.requests", "request", "1", NOV + i * 60_000)).collect::<Vec<_>>());
    wait_charged(&charges, "0.040", 40);
    let (code, _, err) = invoice_cli(&t, &cfg, &["--period", "2026-11"]);
    assert_eq!((code, documents(&invoices).len()), (0, 40), "{err}");
    // An operator grows the topic: tenants would move between issuers.
    let admin: AdminClient<DefaultClientContext> = kafka_client().create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for r in rt.block_on(admin.create_partitions(&[NewPartitions::new(&invoices, 5)], &AdminOptions::new())).unwrap() {
        r.unwrap();
    }
    let (code, _, err) = invoice_cli(&t, &cfg, &["--period", "2026-11"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("partitions were added"), "{err}");
    assert_eq!(read_all(&invoices).len(), 40, "nothing issued twice");
}
