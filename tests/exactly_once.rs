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
    let t = Topics::create("restart", 2);
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
    let log = p.log();
    let life = latest_life(&log);
    assert!(life.matches("state store restored").count() >= 2, "the restarted replica restored both stores");
    let restored = restored_records(life);
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

/// A replica that was down for longer than `idle_timeout` has a backlog, not idle
/// partitions: on restart it must read that backlog before its watermarks move with the
/// wall clock. Here the backlog is two hours old (beyond the one-hour retention), so an
/// early idle advance would send all of it to the late topic instead of counting it.
#[test]
fn a_restart_after_downtime_counts_the_backlog_before_idling() {
    let t = Topics::create("downtime", 2);
    let base = (now_ms() / 60_000 - 120) * 60_000;
    let life = |idle_timeout: &str| format!("checkpoint_interval = \"1s\"\n{}", config("1h", idle_timeout));

    // Life 1 never idles: its windows stay open.
    let phase1 = pulses("a", 4, 30, base, 1_000);
    produce_pulses(&t.source, &phase1);
    let mut p = Proc::run(&t, &life("1h"), &[]);
    wait_pipeline_done(&t);
    assert_eq!(p.terminate(Duration::from_secs(10)).code(), Some(0), "SIGTERM exits 0");
    let down_since = now_ms();
    let state = p.into_state();

    // Downtime: the backlog arrives, and the restarted replica's idle timeout (2 s)
    // passes. The scenario is wall time passing, so this waits for the clock.
    let phase2 = pulses("b", 4, 60, base + 30_000, 1_000);
    produce_pulses(&t.source, &phase2);
    wait_for("the downtime to exceed the idle timeout", DEADLINE, || (now_ms() > down_since + 3_000).then_some(()));

    let _p = Proc::run_in(&t, &life("2s"), &[], state);
    wait_pipeline_done(&t);
    let counted: Vec<P> = phase1.iter().chain(&phase2).cloned().collect();
    // Once the backlog is read, the idle advance closes every window.
    wait_for("every window closed", DEADLINE, || {
        assert_eq!(read_all(&t.late).len(), 0, "no backlog pulse went to the late topic");
        let (got, _) = latest_finals(&t.aggregated);
        fold(&counted, WINDOWS, i64::MAX).keys().all(|k| got.contains_key(k)).then_some(())
    });
    assert_exact(&t, &counted, i64::MAX);
    let (got, _) = latest_finals(&t.aggregated);
    // Also under exactly_once with two source partitions read from a backlog: stage 1
    // forwards them in event-time order, so no window closes before its pulses arrive.
    let corrected: Vec<_> = got.iter().filter(|(_, (rev, _))| *rev > 0).collect();
    assert!(corrected.is_empty(), "no window closed before its backlog was read: {corrected:?}");
}

/// Scale-out: replicas join and leave (gracefully) mid-stream; state moves with the
/// partitions through the changelog, transactions commit before partitions are
/// revoked, and every final aggregate is exact and emitted once per revision.
#[test]
#[ignore = "unfinished (issue 4): passes with exact totals in 34 s, but 2 of 5 runs on Nisshi (2026-11-23) \
            timed out: after the second rebalance one stage-1 partition's last record (offset 3332 of 3333, \
            readable by any consumer) stayed unconsumed for 180 s; not diagnosed"]
fn rebalances_move_state_and_stay_exact() {
    let t = Topics::create_with("scale", 6, 6);
    let config = format!("checkpoint_interval = \"2s\"\n{}", config("1h", "1h"));
    let base = (now_ms() / 60_000 - 30) * 60_000;
    let all = pulses("r", 40, 750, base, 240); // 30,000 pulses over 3 minutes of event time
    let (first, second) = all.split_at(all.len() / 2);

    let a = Proc::run(&t, &config, &[]);
    let mut b = Proc::run(&t, &config, &[]);
    let c = Proc::run(&t, &config, &[]);
    produce_pulses(&t.source, first);
    let aggregate_group = format!("{}.aggregate", t.app);
    wait_for("stage 2 progress", DEADLINE, || (committed(&aggregate_group, &t.grouped).values().sum::<i64>() > 0).then_some(()));
    assert_eq!(b.terminate(Duration::from_secs(10)).code(), Some(0), "a leaving replica exits 0");
    produce_pulses(&t.source, second);
    let d = Proc::run(&t, &config, &[]); // a new replica, no local state
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    // Stream time to base + 10 min on every partition: all windows close.
    let push = pulses("push", 40, 1, base + 600_000, 1);
    produce_pulses(&t.source, &push);
    wait_pipeline_done(&t);
    let counted: Vec<P> = all.iter().chain(&push).cloned().collect();
    let closed_before = base + 600_000 - 5_000;
    wait_for("all windows emitted", DEADLINE, || {
        let (got, _) = latest_finals(&t.aggregated);
        fold(&counted, WINDOWS, closed_before).keys().all(|k| got.contains_key(k)).then_some(())
    });
    assert_exact(&t, &counted, closed_before);
    let restored: u64 = [&a, &c, &d].iter().map(|p| restored_records(&p.log())).sum();
    // How much state moved depends on how far stage 2 got before each rebalance.
    eprintln!("rebalances: {restored} changelog records restored across replicas");
}

/// Outcome of one crash run, for comparing the guarantees.
struct CrashRun {
    /// (aggregate_id, revision) pairs seen more than once among committed records.
    duplicate_revisions: usize,
    /// Committed grouped pulses beyond the number of distinct valid pulses.
    duplicate_grouped: usize,
    /// Records of aborted transactions in the output topics (exactly_once only).
    aborted_records: usize,
}

/// 3 replicas on 6-partition topics; pulses stream in; one replica is killed with
/// SIGKILL mid-stream and a fresh replica (empty state dir) joins later. The latest
/// revision of every committed aggregate must match an independent fold exactly, and
/// the final 10 s aggregates must count every distinct pulse once.
fn crash_run(guarantee: &str) -> CrashRun {
    let total: usize = std::env::var("PULSES_TEST_CRASH_PULSES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let t = Topics::create_with(&format!("crash-{guarantee}"), 6, 6);
    let config = format!(
        "processing_guarantee = \"{guarantee}\"\ncheckpoint_interval = \"2s\"\n{}",
        config("1h", "1h")
    );
    let tenants = 50;
    let base = (now_ms() / 60_000 - 30) * 60_000;
    let per_tenant = (total / tenants) as i64;
    // 50 tenants, event time advancing 100 ms per round: a few minutes of windows.
    let all = pulses("k", tenants, per_tenant, base, 100);
    let resent: Vec<P> = all.iter().step_by(100).cloned().collect(); // duplicates: counted once
    let chunks: Vec<&[P]> = all.chunks(all.len() / 20 + 1).collect();

    let a = Proc::run(&t, &config, &[]);
    let mut b = Proc::run(&t, &config, &[]);
    let c = Proc::run(&t, &config, &[]);
    let aggregate_group = format!("{}.aggregate", t.app);
    let mut d = None;
    for (i, chunk) in chunks.iter().enumerate() {
        produce_pulses(&t.source, chunk);
        if i == 6 {
            // Mid-stream, while stage 2 is busy: kill one replica without warning.
            wait_for("stage 2 progress", DEADLINE, || {
                (committed(&aggregate_group, &t.grouped).values().sum::<i64>() > 0).then_some(())
            });
            b.kill9();
        }
        if i == 12 {
            d = Some(Proc::run(&t, &config, &[])); // a fresh replica, no local state
        }
    }
    produce_pulses(&t.source, &resent);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    let push = pulses("push", tenants, 1, base + (per_tenant + 1) * 100 + 600_000, 1);
    produce_pulses(&t.source, &push);
    wait_pipeline_done(&t);

    let counted: Vec<P> = all.iter().chain(&push).cloned().collect();
    let closed_before = push[0].at - 5_000;
    let expected = fold(&counted, WINDOWS, closed_before);
    let (latest, duplicate_revisions, aborted_aggregates) = wait_for("every window emitted", DEADLINE, || {
        let log = committed::read_log(&t.aggregated);
        let (latest, dups) = latest_committed_finals(&log.committed);
        expected.keys().all(|k| latest.contains_key(k)).then_some((latest, dups, log.aborted))
    });
    for (k, e) in &expected {
        assert_eq!(latest.get(k), Some(e), "{guarantee}: aggregate {k:?}");
    }
    assert_eq!(latest.len(), expected.len(), "{guarantee}: no unexpected final aggregates");
    let postflight: u64 = latest.iter().filter(|(k, _)| k.3 == "postflight").map(|(_, e)| e.count).sum();
    assert_eq!(postflight, counted.len() as u64, "{guarantee}: every distinct pulse counted once in the 10 s windows");

    let grouped = committed::read_log(&t.grouped);
    let run = CrashRun {
        duplicate_revisions,
        duplicate_grouped: grouped.committed.len() - (counted.len() + resent.len()),
        aborted_records: aborted_aggregates + grouped.aborted,
    };
    let restored: u64 = [Some(&a), Some(&c), d.as_ref()].into_iter().flatten().map(|p| restored_records(&p.log())).sum();
    eprintln!(
        "{guarantee}: {} pulses (+{} resent); duplicate (aggregate_id, revision): {}; duplicate grouped: {}; \
         aborted records in the log: {}; changelog records restored: {restored}",
        all.len(), resent.len(), run.duplicate_revisions, run.duplicate_grouped, run.aborted_records
    );
    run
}

/// Latest revision of every final aggregate among `records`, and how many
/// (aggregate_id, revision) pairs occur more than once.
fn latest_committed_finals(records: &[committed::CommittedRecord]) -> (BTreeMap<AggKey, Expect>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0;
    let mut latest: BTreeMap<AggKey, (u64, Expect)> = BTreeMap::new();
    for r in records {
        let v = r.json();
        let rev = v["revision"].as_u64().unwrap();
        if !seen.insert((v["aggregate_id"].as_str().unwrap().to_owned(), rev)) {
            duplicates += 1;
        }
        if v["final"].as_bool() != Some(true) {
            continue;
        }
        let (key, e) = aggregate_of(&v);
        if latest.get(&key).is_none_or(|(r, _)| *r < rev) {
            latest.insert(key, (rev, e));
        }
    }
    (latest.into_iter().map(|(k, (_, e))| (k, e)).collect(), duplicates)
}

/// The same crash under both guarantees: exactly_once commits nothing twice;
/// at_least_once loses nothing either, but re-emits what the dead replica had sent.
#[test]
#[ignore = "needs a broker that hides aborted transactions from read_committed readers (Apache Kafka: \
            PULSES_TEST_BOOTSTRAP=host:port cargo test -- --ignored); Nisshi 0.7.0-pre.2 does not, see \
            scripts/nisshi-txn-check.py"]
fn kill_9_doubles_nothing_under_exactly_once_and_may_under_at_least_once() {
    let run = crash_run("exactly_once");
    assert_eq!(run.duplicate_revisions, 0, "no (aggregate_id, revision) committed twice");
    assert_eq!(run.duplicate_grouped, 0, "no pulse grouped twice among committed records");

    let run = crash_run("at_least_once");
    assert_eq!(run.aborted_records, 0, "at_least_once writes no transactions");
    // The replica died with outputs sent but offsets not committed: its successor
    // processes those records again and emits their outputs a second time.
    assert!(run.duplicate_grouped + run.duplicate_revisions > 0, "the crash re-emitted records");
}
