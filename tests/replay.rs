//! `pulses replay` against a real broker: the broker's offsets-for-time, and a replay
//! that reproduces the live output for the windows inside [T0, T1) without touching the
//! live consumer groups.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use common::agg::*;
use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::BaseRecord;
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;

/// Produces `(partition, timestamp, value)` records with explicit Kafka record
/// timestamps, one flush per `batch` records (so the log holds multi-record batches).
fn produce_at(topic: &str, records: &[(i32, i64, Vec<u8>)], batch: usize) {
    let p = producer();
    for chunk in records.chunks(batch.max(1)) {
        for (partition, ts, value) in chunk {
            send(&p, BaseRecord::<[u8], [u8]>::to(topic).payload(value.as_slice()).timestamp(*ts).partition(*partition));
        }
        flush(&p);
    }
}

fn offset_for_time(topic: &str, ts: i64) -> Offset {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap()).set("group.id", unique("oft")).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(ts)).unwrap();
    let got = c.offsets_for_times(tpl, Duration::from_secs(10)).expect("offsets_for_times");
    got.elements()[0].offset()
}

/// The broker finds the first offset whose record timestamp is at or after T, inside
/// multi-record batches and across them, and says "end" past the last record: what
/// `pulses replay` relies on to start each partition at T0.
#[test]
fn broker_answers_offsets_for_times() {
    let topic = unique("oft");
    create_topics(&[(&topic, 1)]);
    // 20 records at t = 1000, 2000, ..., 20000 in batches of 5.
    let base = 1_700_000_000_000i64;
    let recs: Vec<(i32, i64, Vec<u8>)> = (1..=20).map(|i| (0, base + i * 1000, format!("r{i}").into_bytes())).collect();
    produce_at(&topic, &recs, 5);
    for (ts, want) in [(0, 0), (base + 1000, 0), (base + 1001, 1), (base + 2500, 2), (base + 5000, 4), (base + 6000, 5), (base + 12_000, 11), (base + 20_000, 19)] {
        assert_eq!(offset_for_time(&topic, ts), Offset::Offset(want), "first offset at or after {}", ts - base);
    }
    assert_eq!(offset_for_time(&topic, base + 20_001), Offset::End, "past the last record");
}

/// Latest final revision of every aggregate: aggregate_id → (total, count, start, end).
fn finals_by_id(topic: &str) -> BTreeMap<String, (Decimal, u64, i64, i64)> {
    let mut latest: BTreeMap<String, (u32, (Decimal, u64, i64, i64))> = BTreeMap::new();
    for r in read_all(topic) {
        let v = r.json();
        if !v["final"].as_bool().unwrap() {
            continue;
        }
        let ms = |f: &str| chrono::DateTime::parse_from_rfc3339(v[f].as_str().unwrap()).unwrap().timestamp_millis();
        let rev = v["revision"].as_u64().unwrap() as u32;
        let value = (Decimal::from_str(v["total_amount"].as_str().unwrap()).unwrap(), v["pulse_count"].as_u64().unwrap(), ms("window_start"), ms("window_end"));
        let id = v["aggregate_id"].as_str().unwrap().to_owned();
        if latest.get(&id).is_none_or(|(r, _)| *r < rev) {
            latest.insert(id, (rev, value));
        }
    }
    latest.into_iter().map(|(id, (_, v))| (id, v)).collect()
}

#[test]
fn replay_reproduces_the_live_windows_inside_the_range_and_leaves_live_groups_alone() {
    let t = Topics::create("replay", PARTITIONS);
    // Six minutes of event time, 30 minutes ago: 1800 pulses 200 ms apart over two
    // source partitions, 3 tenants × 2 products, with duplicates and invalid records.
    let base = (now_ms() / 60_000 - 30) * 60_000;
    let products = [("api.requests", "requests"), ("storage.standard", "GB")];
    let pulses: Vec<P> = (0..1800i64)
        .map(|i| {
            let (sku, unit) = products[(i / 3 % 2) as usize];
            P { id: format!("p{i}"), tenant: format!("t{}", i % 3), sku: sku.into(), unit: unit.into(), amount: Decimal::new(i % 97 + 1, 2), at: base + i * 200 }
        })
        .collect();
    let mut records: Vec<(i32, i64, Vec<u8>)> = Vec::new();
    for (i, p) in pulses.iter().enumerate() {
        records.push(((i % 2) as i32, p.at, p.json()));
        if i % 50 == 7 {
            // A re-send of an earlier pulse (same pulse_id), on the other partition.
            let earlier = &pulses[i - 5];
            records.push((((i + 1) % 2) as i32, p.at, earlier.json()));
        }
        if i % 100 == 3 {
            records.push((0, p.at, br#"{"tenant_id":"t0","used_amount":"1"}"#.to_vec()));
        }
    }
    produce_at(&t.source, &records, 1000);
    let cfg = config("1h", "2s");
    let live = Proc::run(&t, &cfg, &[]);
    let expected_all = fold(&pulses, WINDOWS, i64::MAX);
    wait_pipeline_done(&t);
    wait_for("every live window final", DEADLINE, || (latest_finals(&t.aggregated).0.len() == expected_all.len()).then_some(()));
    let live_finals = finals_by_id(&t.aggregated);

    let (group_source, group_grouped) = (format!("{}.group", t.app), format!("{}.aggregate", t.app));
    let before = (committed(&group_source, &t.source), committed(&group_grouped, &t.grouped));
    assert!(!before.0.is_empty() && !before.1.is_empty());

    // T0 on a minute boundary; T1 mid-minute, so windows crossing it are left out.
    let (t0, t1) = (base + 60 * SECOND, base + 295 * SECOND);
    let out = format!("{}.replay", t.app);
    let cfg_path = live.state_dir.path().join("replay.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let replay = |range: &[&str], out: &str| {
        let replay_state = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let run = Command::new(pulses_bin())
            .arg("replay")
            .args(t.flags())
            .arg("--config").arg(&cfg_path)
            .arg("--state-dir").arg(replay_state.path())
            .args(range)
            .args(["--output-topic", out])
            .output()
            .expect("run pulses replay");
        let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
        eprintln!("replay {range:?} took {:?}: {stdout}", started.elapsed());
        assert!(run.status.success(), "replay exited with {:?}: {}", run.status, String::from_utf8_lossy(&run.stderr));
        assert!(stdout.contains("duplicates") && stdout.contains("aggregates"), "summary printed: {stdout}");
        assert_eq!(std::fs::read_dir(replay_state.path()).unwrap().count(), 0, "temporary state deleted");
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let stderr = replay(&["--from", &rfc3339(t0), "--to", &t1.to_string(), "--progress-interval", "1ms"], &out);
    assert!(stderr.contains("records read"), "progress lines on stderr: {stderr}");

    let after = (committed(&group_source, &t.source), committed(&group_grouped, &t.grouped));
    assert_eq!(before, after, "the live groups' committed offsets are unchanged");
    assert!(committed(&format!("{}.replay", t.app), &t.source).is_empty(), "replay commits nothing");

    let replayed = finals_by_id(&out);
    let inside = |(_, _, start, end): &(Decimal, u64, i64, i64)| *start >= t0 && *end <= t1;
    let live_inside: BTreeMap<_, _> = live_finals.iter().filter(|(_, v)| inside(v)).map(|(k, v)| (k.clone(), *v)).collect();
    assert!(replayed.values().all(inside), "only windows inside [T0, T1) are written");
    // Independently: minute windows [1,2)..[3,4) min, postflight up to [280,290) s, inflight up to [294,295) s.
    let want = fold(&pulses, WINDOWS, t1).into_iter().filter(|(k, _)| k.4 >= t0).count();
    assert_eq!(live_inside.len(), want);
    assert_eq!(replayed.len(), want);
    assert_eq!(replayed, live_inside, "replay output = live output for windows inside [T0, T1)");
    eprintln!("{} windows identical (of {} live windows)", replayed.len(), live_finals.len());

    // Without --to: to the log end, every window closed; all windows from T0 on match.
    let out_open = format!("{}.replay-open", t.app);
    replay(&["--from", &t0.to_string()], &out_open);
    let from_t0: BTreeMap<_, _> = live_finals.iter().filter(|(_, v)| v.2 >= t0).map(|(k, v)| (k.clone(), *v)).collect();
    assert_eq!(from_t0.len(), fold(&pulses, WINDOWS, i64::MAX).into_iter().filter(|(k, _)| k.4 >= t0).count());
    assert_eq!(finals_by_id(&out_open), from_t0, "replay to the end = live output for windows from T0");
    assert_eq!(before, (committed(&group_source, &t.source), committed(&group_grouped, &t.grouped)));
}
