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

/// An aggregate's (total, count, start, end).
type Totals = (Decimal, u64, i64, i64);

/// Latest final revision of every aggregate: aggregate_id → its totals.
fn finals_by_id(topic: &str) -> BTreeMap<String, Totals> {
    let mut latest: BTreeMap<String, (u32, Totals)> = BTreeMap::new();
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
    // Late pulses: produced at 400 s, after T1 (295 s) but within retention, for
    // windows inside [T0, T1) that live has closed by then: live corrects them, so a
    // replay must read past T1 to reproduce the corrections.
    let late: Vec<P> = (0..30i64)
        .map(|i| P { id: format!("late{i}"), tenant: format!("t{}", i % 3), sku: products[0].0.into(), unit: products[0].1.into(),
            amount: Decimal::new(i + 1, 1), at: base + 100 * SECOND + i * 5 * SECOND })
        .collect();
    records.extend(late.iter().enumerate().map(|(i, p)| ((i % 2) as i32, base + 400 * SECOND, p.json())));
    produce_at(&t.source, &records, 1000);
    let pulses: Vec<P> = pulses.into_iter().chain(late).collect();
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
    let replay = |range: &[&str], out: &str| run_replay(&t, &cfg_path, range, out);
    let (_, stderr) = replay(&["--from", &rfc3339(t0), "--to", &t1.to_string(), "--progress-interval", "1ms"], &out);
    assert!(stderr.contains("records read"), "progress lines on stderr: {stderr}");

    let after = (committed(&group_source, &t.source), committed(&group_grouped, &t.grouped));
    assert_eq!(before, after, "the live groups' committed offsets are unchanged");
    assert!(committed(&format!("{}.replay", t.app), &t.source).is_empty(), "replay commits nothing");

    let live_inside = assert_replay_equals_live(&pulses, &live_finals, &finals_by_id(&out), t0, t1);
    eprintln!("{} windows identical (of {} live windows)", live_inside, live_finals.len());

    // Without --to: to the log end, every window closed; all windows from T0 on match.
    let out_open = format!("{}.replay-open", t.app);
    replay(&["--from", &t0.to_string()], &out_open);
    let from_t0: BTreeMap<_, _> = live_finals.iter().filter(|(_, v)| v.2 >= t0).map(|(k, v)| (k.clone(), *v)).collect();
    assert_eq!(from_t0.len(), fold(&pulses, WINDOWS, i64::MAX).into_iter().filter(|(k, _)| k.4 >= t0).count());
    assert_eq!(finals_by_id(&out_open), from_t0, "replay to the end = live output for windows from T0");
    assert_eq!(before, (committed(&group_source, &t.source), committed(&group_grouped, &t.grouped)));
}

/// The replayed finals are the live finals of the windows inside [T0, T1), and those
/// are the fold of `pulses` (totals and counts, window by window); returns how many.
fn assert_replay_equals_live(
    pulses: &[P],
    live: &BTreeMap<String, (Decimal, u64, i64, i64)>,
    replayed: &BTreeMap<String, (Decimal, u64, i64, i64)>,
    t0: i64,
    t1: i64,
) -> usize {
    let inside = |(_, _, start, end): &(Decimal, u64, i64, i64)| *start >= t0 && *end <= t1;
    let live_inside: BTreeMap<_, _> = live.iter().filter(|(_, v)| inside(v)).map(|(k, v)| (k.clone(), *v)).collect();
    assert!(replayed.values().all(inside), "only windows inside [T0, T1) are written");
    let size = |name: &str| WINDOWS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s).unwrap();
    let mut want: Vec<(i64, i64, Decimal, u64)> = fold(pulses, WINDOWS, t1)
        .into_iter()
        .filter(|(k, _)| k.4 >= t0)
        .map(|(k, e)| (k.4, k.4 + size(&k.3), e.total, e.count))
        .collect();
    want.sort();
    let mut live_values: Vec<(i64, i64, Decimal, u64)> = live_inside.values().map(|(total, count, start, end)| (*start, *end, *total, *count)).collect();
    live_values.sort();
    assert_eq!(live_values, want, "live windows inside [T0, T1) = the fold of the input");
    assert_eq!(replayed, &live_inside, "replay output = live output for windows inside [T0, T1)");
    live_inside.len()
}

/// Pulses produced with kcat as users do (record time = when kcat ran, event time in
/// the line), then late ones for windows live has closed: a replay of a range that
/// ended before kcat ran still reads them all, choosing windows by event time, and
/// reproduces the live output, corrections included.
#[test]
fn replay_of_kcat_lines_with_late_pulses_equals_live() {
    let t = Topics::create("replay-kcat", 2);
    let base = (now_ms() / 60_000 - 4) * 60_000;
    let kcat = |lines: &[P]| {
        use std::io::Write;
        let mut child = Command::new("kcat")
            .args(["-P", "-b", &bootstrap(), "-t", &t.source])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run kcat");
        let text: String = lines.iter().map(|p| format!("{}\n", String::from_utf8_lossy(&p.json()))).collect();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "kcat -P failed");
    };
    let on_time: Vec<P> = (0..240i64)
        .map(|i| P { id: format!("k{i}"), tenant: format!("t{}", i % 3), sku: "api.requests".into(), unit: "requests".into(),
            amount: Decimal::new(i % 13 + 1, 1), at: base + i * 500 })
        .collect();
    kcat(&on_time);
    let cfg = config("1h", "2s");
    let live = Proc::run(&t, &cfg, &[]);
    wait_pipeline_done(&t);
    // Every window of the on-time pulses closes (idle watermarks), then the late ones come.
    let all_on_time = fold(&on_time, WINDOWS, i64::MAX).len();
    wait_for("every on-time window final", DEADLINE, || (latest_finals(&t.aggregated).0.len() == all_on_time).then_some(()));
    let late: Vec<P> = (0..12i64)
        .map(|i| P { id: format!("late{i}"), tenant: format!("t{}", i % 3), sku: "api.requests".into(), unit: "requests".into(),
            amount: Decimal::new(7, 2), at: base + 3 * SECOND + i * 4 * SECOND })
        .collect();
    kcat(&late);
    wait_pipeline_done(&t);
    let pulses: Vec<P> = on_time.iter().chain(&late).cloned().collect();
    let live_finals = finals_by_id(&t.aggregated);
    let corrections = read_all(&t.aggregated).iter().filter(|r| r.json()["revision"].as_u64() > Some(0)).count();
    assert!(corrections > 0, "live corrected closed windows with the late pulses");

    let (t0, t1) = (base, base + 60 * SECOND);
    assert!(t1 < now_ms() - 60 * SECOND, "kcat ran after T1: record times are all past it");
    let cfg_path = live.state_dir.path().join("replay.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let out = format!("{}.replay", t.app);
    run_replay(&t, &cfg_path, &["--from", &t0.to_string(), "--to", &t1.to_string()], &out);
    let n = assert_replay_equals_live(&pulses, &live_finals, &finals_by_id(&out), t0, t1);
    assert!(n >= 60 + 6 + 3, "inflight, postflight and minute windows of 3 tenants: {n}");
    eprintln!("{n} windows identical, {corrections} live corrections reproduced");
}
