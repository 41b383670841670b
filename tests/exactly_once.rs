//! State that survives: restarts restore from the local store and the changelog tail,
//! a replica without local state restores from the changelog alone, and the results
//! stay exact. Against the real broker, with `processing_guarantee = "exactly_once"`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::agg::*;
use common::*;
use rust_decimal::Decimal;

/// Sum of `restored_records=N` over the "state store restored" lines of `log`.
fn restored_records(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("state store restored"))
        .map(|l| {
            let v = l.split("restored_records=").nth(1).expect("restored_records field");
            v.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap()
        })
        .sum()
}

/// The part of a replica's log written by its latest life.
fn latest_life(log: &str) -> &str {
    log.rfind("stage 2 (aggregate) started").map_or(log, |i| &log[i..])
}

fn pulses(prefix: &str, tenants: usize, per_tenant: i64, base: i64, step_ms: i64) -> Vec<P> {
    let mut out = Vec::new();
    for i in 0..per_tenant {
        for t in 0..tenants {
            out.push(P {
                id: format!("{prefix}-{t}-{i}"),
                tenant: format!("tenant-{t}"),
                sku: if i % 2 == 0 { "storage.standard".into() } else { "api.requests".into() },
                unit: if i % 2 == 0 { "GB".into() } else { "requests".into() },
                amount: Decimal::new(i * 7 + t as i64 + 1, 2),
                at: base + i * step_ms + t as i64,
            });
        }
    }
    out
}

fn assert_exact(t: &Topics, counted: &[P], closed_before: i64) {
    let expected = fold(counted, WINDOWS, closed_before);
    let (got, emitted) = latest_finals(&t.aggregated); // also: no (aggregate_id, revision) twice
    let got: BTreeMap<AggKey, Expect> = got.into_iter().map(|(k, (_, e))| (k, e)).collect();
    for (k, e) in &expected {
        assert_eq!(got.get(k), Some(e), "aggregate {k:?}");
    }
    assert_eq!(got.len(), expected.len(), "no unexpected final aggregates ({emitted} records)");
}

#[test]
fn restarts_restore_the_changelog_tail_and_stay_exact() {
    let t = Topics::create("restart", 3);
    let config = format!("checkpoint_interval = \"1s\"\n{}", config("1h", "1h"));
    let base = (now_ms() / 60_000 - 20) * 60_000;

    // Life 1: one minute of event time for 6 tenants, windows left open.
    let phase1 = pulses("a", 6, 120, base, 500);
    produce_pulses(&t.source, &phase1);
    let mut p = Proc::run(&t, &config, &[]);
    wait_pipeline_done(&t);
    let status = p.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    let changelog_written = read_all(&format!("{}-windows-changelog", t.app)).len() as u64;
    assert!(changelog_written > 0, "stage 2 wrote its state changes to the changelog");
    let state = p.into_state();
    let checkpoint = state.path().join(format!("state/checkpoints/{}/{}-0/CHECKPOINT.json", t.app, t.grouped));
    assert!(checkpoint.exists(), "a checkpoint was written: {}", checkpoint.display());

    // Life 2, same state dir: only the changelog tail is restored. Then stream time
    // moves to base + 3 min: every window of phase 1 and 2 closes.
    let phase2 = pulses("b", 6, 60, base + 60_000, 1_000);
    let push = pulses("push", 6, 1, base + 180_000, 1);
    produce_pulses(&t.source, &phase2);
    produce_pulses(&t.source, &push);
    let mut p = Proc::run_in(&t, &config, &[], state);
    wait_pipeline_done(&t);
    let restored = restored_records(latest_life(&p.log()));
    assert!(
        restored < changelog_written,
        "restart restored {restored} of {changelog_written} changelog records: the local state was used"
    );
    eprintln!("restart: restored {restored} of {changelog_written} changelog records");
    let counted: Vec<P> = phase1.iter().chain(&phase2).chain(&push).cloned().collect();
    let closed_before = base + 180_000 - 5_000;
    wait_for("phase 1 and 2 windows emitted", DEADLINE, || {
        let (got, _) = latest_finals(&t.aggregated);
        fold(&counted, WINDOWS, closed_before).keys().all(|k| got.contains_key(k)).then_some(())
    });
    assert_exact(&t, &counted, closed_before);
    assert_eq!(p.terminate(Duration::from_secs(10)).code(), Some(0));
    drop(p);

    // Life 3, a new replica with no local state: everything comes from the changelog,
    // closed windows included, so late pulses still correct them exactly.
    let late: Vec<P> = pulses("late", 6, 4, base + 2_000, 9_000);
    produce_pulses(&t.source, &late);
    let p = Proc::run(&t, &config, &[]);
    wait_pipeline_done(&t);
    let restored = restored_records(&p.log());
    assert!(restored > 0, "a replica without local state restores from the changelog");
    eprintln!("new replica: restored {restored} changelog records");
    let counted: Vec<P> = counted.into_iter().chain(late).collect();
    assert_exact(&t, &counted, closed_before);
}
