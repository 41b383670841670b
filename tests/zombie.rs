//! A zombie replica: frozen (SIGSTOP) past its session timeout while its partitions
//! move, then resumed: nothing it had not committed becomes visible, totals stay exact. Its own binary, so it does not run beside the other multi-replica
//! crash tests of `exactly_once.rs` on the 2 cores (with it there, RocksDB's flush in the
//! long-restore test was starved long enough to miss its 6 s max.poll.interval.ms).

mod common;

use std::time::Duration;

use common::agg::*;
use common::replicas::*;
use common::*;

/// A zombie: replica A is frozen (SIGSTOP) with a stage-2 transaction open, past its
/// session timeout, so the group gives its partitions to B, which restores them and
/// goes on. Then A is resumed (SIGCONT) with that work uncommitted: a commit of it
/// carries offsets of a generation that is gone, so the group coordinator refuses them
/// (or the broker has already aborted the transaction for its timeout, or A sees its
/// partitions lost first and drops the work). Nothing of it becomes visible: totals
/// stay exact, no (aggregate_id, revision) appears twice, and A rejoins and exits
/// cleanly on SIGTERM.
#[test]
fn a_frozen_replica_resumed_after_its_partitions_moved_is_fenced() {
    let t = Topics::create("zombie", PARTITIONS);
    let config = config("1h", "1h");
    let tenants = 30;
    let base = (now_ms() / 60_000 - 30) * 60_000;
    let all = pulses("z", tenants, 2_000, base, 100);
    let chunks: Vec<&[P]> = all.chunks(all.len() / 10 + 1).collect();
    let mut a = Proc::run(&t, &config, &[]);
    let b = Proc::run(&t, &config, &[]);
    a.wait_ready();
    b.wait_ready();
    let changelog = format!("{}-windows-changelog", t.app);
    produce_pulses(&t.source, chunks[0]);
    // Freeze A while input flows (small paced slices, so transactions keep opening)
    // and one of its stage-2 transactions is open.
    std::thread::scope(|s| {
        s.spawn(|| {
            for slice in chunks[1..6].iter().flat_map(|c| c.chunks(100)) {
                produce_pulses(&t.source, slice);
                std::thread::sleep(Duration::from_millis(20)); // pacing, not waiting
            }
        });
        wait_for("replica A with a stage-2 transaction open", DEADLINE, || {
            let owned = stage2_partitions(latest_life(&a.log()));
            open_transactions(&changelog).iter().any(|p| owned.contains(p)).then_some(())
        });
        a.signal("STOP");
    });
    let frozen_log = a.log().len();
    // B takes every grouped partition (A missed its heartbeats for the session timeout).
    wait_for("replica B to own every grouped partition", DEADLINE, || {
        (stage2_partitions(latest_life(&b.log())).len() == PARTITIONS as usize).then_some(())
    });
    a.signal("CONT");
    // Resumed, A learns it is out of the group: either its commit comes first and is
    // refused (the stage is replaced), or the lost partitions come first and whatever
    // it had open is dropped. Which one depends on where the freeze caught it.
    wait_for("the resumed replica A to give up its stale work", DEADLINE, || {
        let resumed = a.log().get(frozen_log..)?.to_owned();
        (resumed.contains("stage failed on Kafka; replacing it") || resumed.contains("partitions lost")).then_some(())
    });
    for chunk in &chunks[6..] {
        produce_pulses(&t.source, chunk);
    }
    let push = pulses("push", tenants, 1, base + 2_000 * 100 + 600_000, 1);
    produce_pulses(&t.source, &push);
    wait_pipeline_done(&t);
    let counted: Vec<P> = all.iter().chain(&push).cloned().collect();
    assert_exact(&t, &counted, push[0].at - 5_000);
    let (_, duplicate_revisions) = latest_committed_finals(&read_all(&t.aggregated));
    assert_eq!(duplicate_revisions, 0, "no output of the zombie is visible to a read_committed reader");
    let resumed = a.log()[frozen_log..].to_owned();
    eprintln!(
        "zombie: {} pulses; after SIGCONT replica A logged: {}",
        all.len(),
        resumed.lines().filter(|l| l.contains("failed") || l.contains("fenced") || l.contains("lost")).take(3).collect::<Vec<_>>().join(" | ")
    );
    assert_eq!(a.terminate(Duration::from_secs(30)).code(), Some(0), "the former zombie exits cleanly");
}
