//! The fault users meet more often than a crashed replica: the broker itself dies
//! (SIGKILL) mid-stream and comes back 10 s later on the same data directory. pulses
//! keeps running, reconnects, and the totals stay exact under exactly_once.
//!
//! This test kills a broker, so it runs its own: `scripts/broker` on a port of its own
//! (`PULSES_TEST_FAULT_BROKER_PORT`, default 19092, controller on the next port), never
//! the shared broker the other tests use. It is the only test of this binary, so it
//! points the harness at that broker through the environment before any client exists.

mod common;

use std::time::{Duration, Instant};

use common::agg::*;
use common::own_broker::OwnBroker;
use common::*;

#[test]
fn a_broker_killed_mid_stream_and_restarted_loses_and_doubles_nothing() {
    let broker = OwnBroker::start_for_this_binary("PULSES_TEST_FAULT_BROKER_PORT", "19092");

    let t = Topics::create("broker-fault", PARTITIONS);
    let config = format!("checkpoint_interval = \"2s\"\n{}", config("1h", "1h"));
    let base = (now_ms() / 60_000 - 30) * 60_000;
    let tenants = 20;
    let first = vcpu_pulses("a", tenants, 2_500, base, 50); // 50,000 pulses over 125 s of event time
    let second = vcpu_pulses("b", tenants, 1_000, base + 125_000, 50);
    let push = vcpu_pulses("push", tenants, 1, base + 600_000, 1);

    let mut replica = Proc::run(&t, &config, &[]);
    produce_pulses(&t.source, &first);
    let aggregate_group = format!("{}.aggregate", t.app);
    wait_for("stage 2 progress", DEADLINE, || (committed(&aggregate_group, &t.grouped).values().sum::<i64>() > 0).then_some(()));

    // The broker dies while stage 2 is committing, and is down for 10 s: wall time
    // passing is the scenario here, not a wait for a condition.
    broker.script(&["kill"]);
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    broker.script(&["start", "--keep-data"]);
    eprintln!("broker down for {:?}", killed.elapsed());
    assert!(replica.child.try_wait().expect("try_wait").is_none(), "pulses kept running through the outage");

    produce_pulses(&t.source, &second);
    produce_pulses(&t.source, &push);
    wait_pipeline_done(&t);
    eprintln!("grouped pulses after the outage: {}", read_all(&t.grouped).len());
    let counted: Vec<P> = first.iter().chain(&second).chain(&push).cloned().collect();
    let closed_before = base + 600_000 - 5_000;
    let expected = fold(&counted, WINDOWS, closed_before);
    let (latest, records) = wait_until("every window emitted", DEADLINE, || {
        let (latest, records) = latest_finals(&t.aggregated); // also: no (aggregate_id, revision) twice
        let missing: Vec<_> = expected.keys().filter(|k| !latest.contains_key(*k)).collect();
        match missing.first() {
            None => Ok((latest, records)),
            Some(_) => Err(format!("{} of {} final windows missing: {:?}", missing.len(), expected.len(), &missing[..missing.len().min(25)])),
        }
    });
    for (k, e) in &expected {
        assert_eq!(latest.get(k).map(|(_, e)| e), Some(e), "aggregate {k:?}");
    }
    assert_eq!(latest.len(), expected.len(), "no unexpected final aggregates");
    let grouped = read_all(&t.grouped).len();
    assert_eq!(grouped, counted.len(), "every pulse grouped exactly once");
    let postflight: u64 = latest.iter().filter(|(k, _)| k.3 == "postflight").map(|(_, (_, e))| e.count).sum();
    // The push pulses only move stream time; their own windows stay open.
    assert_eq!(postflight, (first.len() + second.len()) as u64, "every pulse counted once in the closed 10 s windows");
    assert!(replica.child.try_wait().expect("try_wait").is_none(), "the same pulses process did all of it");
    eprintln!("broker fault: {} pulses, {records} aggregate records, {} final windows exact", counted.len(), expected.len());
    assert_eq!(replica.terminate(Duration::from_secs(30)).code(), Some(0), "SIGTERM exits 0 after the outage");
}
