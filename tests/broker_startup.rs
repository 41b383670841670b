//! Commands started as a user starts them: before the broker is up. `pulses run`,
//! `pulses rate`, `pulses serve` and `pulses keys create` wait for it (retrying with
//! backoff; `run`'s `/readyz` saying what for), then come up on a freshly formatted
//! broker, which answers NOT_COORDINATOR and COORDINATOR_LOAD_IN_PROGRESS for a while,
//! and work: the key is written, pulses sent over HTTP are taken, totals and charges are
//! exact.
//!
//! It starts and stops a broker, so it runs its own: `scripts/broker` on a port of its
//! own (`PULSES_TEST_STARTUP_BROKER_PORT`, default 19292, controller on the next port),
//! never the shared broker the other tests use. It is the only test of this binary.

mod common;

use std::process::{Command, Stdio};

use common::agg::*;
use common::own_broker::OwnBroker;
use common::rating::wait_charged;
use common::serve::{batch, client, post};
use common::*;
use rust_decimal::Decimal;

/// $0.001 per request.
const BOOK: &str = r#"
currency = "USD"
rounding = { scale = 3, mode = "half_even" }

[[prices]]
product_sku = "api.requests"
use_unit = "request"
model = "flat"
unit_price = "0.001"
"#;

#[test]
fn run_rate_serve_and_keys_started_before_the_broker_come_up_with_it_and_are_exact() {
    let broker = OwnBroker::not_started_for_this_binary("PULSES_TEST_STARTUP_BROKER_PORT", "19292");
    let t = Topics::named("before-broker");
    let cfg = config("1h", "2s");
    let mut run = Proc::run(&t, &cfg, &[]);
    let rate_state = tempfile::tempdir().expect("tempdir");
    let book = rate_state.path().join("price-book.toml");
    std::fs::write(&book, BOOK).expect("price book");
    let charges = format!("{}.charges", t.app);
    let alerts = format!("{}.alerts", t.app);
    let args = ["--price-book", book.to_str().expect("utf-8 path"), "--charges-topic", &charges, "--alerts-topic", &alerts];
    let mut rate = Proc::start("rate", &t, &cfg, &args, rate_state);
    let mut serve = Proc::start("serve", &t, &cfg, &[], tempfile::tempdir().expect("tempdir"));
    let keys = Command::new(pulses_bin())
        .args(["keys", "create", "--admin"])
        .args(t.flags())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pulses keys");

    // No broker: pulses run is alive, not ready, and says what it waits for.
    let addr = run.http_addr();
    let why = wait_for("/readyz to say it waits for the broker", DEADLINE, || {
        let (status, body) = http::get(&addr, "/readyz")?;
        (status == 503 && body.contains("waiting for the broker")).then_some(body)
    });
    eprintln!("before the broker: /readyz 503 {why}");
    wait_for("pulses rate to retry", DEADLINE, || rate.log().contains("broker not ready yet; retrying").then_some(()));
    wait_for("pulses serve to retry", DEADLINE, || serve.log().contains("broker not ready yet; retrying").then_some(()));
    assert!(run.child.try_wait().expect("try_wait").is_none(), "pulses run waits for the broker");
    assert!(rate.child.try_wait().expect("try_wait").is_none(), "pulses rate waits for the broker");
    assert!(serve.child.try_wait().expect("try_wait").is_none(), "pulses serve waits for the broker");

    // A fresh broker; the source topic is created as a producer's admin would.
    broker.script(&["start"]);
    create_topics(&[(&t.source, 3)]);
    // 300 requests, 10 per second from 40 s past a minute: minute windows of 200 and 100.
    let base = (now_ms() / 60_000 - 5) * 60_000 + 40 * SECOND;
    let requests: Vec<P> = (0..300)
        .map(|i| P {
            id: format!("r{i}"),
            tenant: "one".into(),
            sku: "api.requests".into(),
            unit: "request".into(),
            amount: Decimal::ONE,
            at: base + i * 100,
        })
        .collect();
    produce_pulses(&t.source, &requests);
    // The key written once the broker came up; with it, 100 requests of tenant "two"
    // over HTTP, in the first of those minutes.
    let out = keys.wait_with_output().expect("pulses keys");
    assert!(out.status.success(), "pulses keys create: {}", String::from_utf8_lossy(&out.stderr));
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pulses keys create prints JSON");
    let secret = key["secret"].as_str().expect("a secret").to_owned();
    let over_http: Vec<P> = (0..100)
        .map(|i| P { id: format!("h{i}"), tenant: "two".into(), sku: "api.requests".into(), unit: "request".into(), amount: Decimal::ONE, at: base + i * 100 })
        .collect();
    let addr = serve.wait_ready();
    let (status, answer) = post(&client(), &addr, &secret, batch(&over_http), &[]);
    assert_eq!(status, 202, "{answer}");
    let all: Vec<P> = requests.iter().chain(&over_http).cloned().collect();
    run.wait_ready();
    wait_pipeline_done(&t);
    // Idle partitions close every window (idle timeout 2 s): all of them are final.
    assert_exact(&t, &all, now_ms());

    // Every final minute aggregate charged once: 400 × $0.001.
    wait_charged(&charges, "0.400", 3);
    // (run's first attempt may simply last until the broker answers: no retry then.)
    for (name, p) in [("run", &run), ("rate", &rate), ("serve", &serve)] {
        eprintln!("pulses {name}: {} start-up retries logged", p.log().matches("broker not ready yet; retrying").count());
    }
    assert_eq!(serve.terminate(std::time::Duration::from_secs(30)).code(), Some(0));
    assert_eq!(rate.terminate(std::time::Duration::from_secs(30)).code(), Some(0));
    assert_eq!(run.terminate(std::time::Duration::from_secs(30)).code(), Some(0));
}
