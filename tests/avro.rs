//! Avro with a Confluent Schema Registry against the real broker and the real binary,
//! with the in-process registry double (tests/common/registry.rs). Expectations are
//! computed here from the test's own input, never by pulses' code.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use common::agg::*;
use common::registry::{avro, RegistryDouble};
use common::*;
use rust_decimal::Decimal;

const GROUP_ONLY: &[&str] = &["--stages", "group"];

fn registry_config(url: &str, extra: &str) -> String {
    format!("[schema_registry]\nurl = \"{url}\"\n{extra}\n")
}

/// `n` pulses over 10 tenants and 3 products, amounts of scale 0 to 4 for every tenant.
fn pulses(n: usize, prefix: &str, base: i64) -> Vec<P> {
    let skus = [("storage.standard", "GB"), ("compute.vcpu", "vCPU-s"), ("api.requests", "requests")];
    (0..n)
        .map(|i| {
            let (sku, unit) = skus[i % 3];
            P {
                id: format!("{prefix}-{i}"),
                tenant: format!("tenant-{}", i % 10),
                sku: sku.into(),
                unit: unit.into(),
                amount: Decimal::new(((i * 7_919) % 100_000 + 1) as i64, ((i / 10) % 5) as u32),
                at: base + i as i64,
            }
        })
        .collect()
}

/// Even pulses as Avro (schema `id`), odd ones as JSON, interleaved.
fn mixed(ps: &[P], id: u32) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let schema = avro::parse(&avro::schema_text("pulse.avsc"));
    ps.iter()
        .enumerate()
        .map(|(i, p)| (Some(p.id.clone().into_bytes()), if i % 2 == 0 { avro::pulse(&schema, id, p) } else { p.json() }))
        .collect()
}

fn per_tenant(ps: &[P]) -> BTreeMap<String, (Decimal, usize)> {
    let mut out: BTreeMap<String, (Decimal, usize)> = BTreeMap::new();
    for p in ps {
        let e = out.entry(p.tenant.clone()).or_default();
        e.0 += p.amount;
        e.1 += 1;
    }
    out
}

/// Per-tenant (total, count) of JSON grouped records.
fn grouped_totals(records: &[Record]) -> BTreeMap<String, (Decimal, usize)> {
    let mut out: BTreeMap<String, (Decimal, usize)> = BTreeMap::new();
    for r in records {
        let v = r.json();
        let e = out.entry(v["tenant_id"].as_str().unwrap().to_owned()).or_default();
        e.0 += Decimal::from_str(v["used_amount"].as_str().unwrap()).unwrap();
        e.1 += 1;
    }
    out
}

#[test]
fn mixed_avro_and_json_stream_groups_exactly() {
    let t = Topics::create("avro-mixed", PARTITIONS);
    let reg = RegistryDouble::start();
    let id = reg.register(&format!("{}-value", t.source), &avro::schema_text("pulse.avsc"));
    let input = pulses(10_000, "m", 1_795_341_600_000);
    produce(&t.source, &mixed(&input, id));

    let _p = Proc::run(&t, &registry_config(&reg.url, ""), GROUP_ONLY);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    assert_eq!(read_all(&t.dlq).len(), 0, "nothing rejected");
    let grouped = read_all(&t.grouped);
    assert_eq!(grouped.len(), 10_000);

    // JSON-only equivalent: the same pulses summed here, exactly.
    let by_id: HashMap<&str, &P> = input.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut ids = HashSet::new();
    for r in &grouped {
        let v = r.json();
        let id = v["pulse_id"].as_str().unwrap();
        assert!(ids.insert(id.to_owned()), "{id} grouped twice");
        let p = by_id[id];
        assert_eq!(v["used_amount"].as_str().unwrap(), p.amount.to_string(), "amount of {id} kept digit for digit");
        assert_eq!(v["event_time"].as_str().unwrap(), rfc3339(p.at));
        assert_eq!((v["tenant_id"].as_str().unwrap(), r.key_str().as_str()), (p.tenant.as_str(), p.tenant.as_str()));
        assert_eq!((v["product_sku"].as_str().unwrap(), v["use_unit"].as_str().unwrap()), (p.sku.as_str(), p.unit.as_str()));
    }
    let want = per_tenant(&input);
    assert_eq!(grouped_totals(&grouped), want);
    eprintln!("per-tenant totals: {want:?}");
    // The schema was fetched once and cached.
    assert_eq!(reg.counters.by_id.load(Ordering::Relaxed), 1);
}

#[test]
fn unknown_schema_and_corrupt_avro_go_to_the_dlq() {
    let t = Topics::create("avro-dlq", 1);
    let reg = RegistryDouble::start();
    let schema_text = avro::schema_text("pulse.avsc");
    let id = reg.register(&format!("{}-value", t.source), &schema_text);
    let schema = avro::parse(&schema_text);
    let good = pulses(30, "g", 1_795_341_600_000);
    let mut records = Vec::new();
    let mut want: HashMap<String, &str> = HashMap::new();
    for (i, p) in good.iter().enumerate() {
        records.push((Some(p.id.clone().into_bytes()), avro::pulse(&schema, id, p)));
        let mut n = 0;
        let mut bad = |kind: &'static str, value: Vec<u8>| {
            n += 1;
            let key = format!("{kind}-{i}-{n}");
            want.insert(key.clone(), kind);
            records.push((Some(key.into_bytes()), value));
        };
        // An id the registry has never seen.
        bad("unknown_schema", avro::pulse(&schema, 9_000 + i as u32, p));
        // A valid id, bytes that are not a pulse: cut short, or garbage.
        let full = avro::pulse(&schema, id, p);
        bad("invalid_avro", full[..full.len() - 3].to_vec());
        bad("invalid_avro", avro::framed(id, &[0xff; 12]));
        // Magic byte and not even a whole schema id.
        bad("invalid_avro", vec![0, 0, 1]);
        // Decodes fine, fails the pulse rules: the JSON reason.
        let negative = P { amount: -p.amount, ..p.clone() };
        bad("negative_amount", avro::pulse(&schema, id, &negative));
    }
    produce(&t.source, &records);

    let _p = Proc::run(&t, &registry_config(&reg.url, ""), GROUP_ONLY);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    let dlq = read_all(&t.dlq);
    assert_eq!(dlq.len(), want.len());
    let originals: HashMap<String, Vec<u8>> = records.iter().map(|(k, v)| (String::from_utf8(k.clone().unwrap()).unwrap(), v.clone())).collect();
    let mut per_reason: BTreeMap<String, usize> = BTreeMap::new();
    for r in &dlq {
        let key = r.key_str();
        assert_eq!(r.headers["error.reason"], want[&key], "{key}: {}", r.headers["error.detail"]);
        assert_eq!(r.value, originals[&key], "DLQ keeps the original bytes");
        *per_reason.entry(r.headers["error.reason"].clone()).or_default() += 1;
    }
    assert_eq!(
        per_reason,
        BTreeMap::from([("invalid_avro".into(), 90), ("negative_amount".into(), 30), ("unknown_schema".into(), 30)])
    );
    let grouped = read_all(&t.grouped);
    let ids: HashSet<String> = grouped.iter().map(|r| r.json()["pulse_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, good.iter().map(|p| p.id.clone()).collect());
    assert_eq!(grouped.len(), good.len());
}

#[test]
fn a_30s_registry_outage_loses_no_pulse() {
    let t = Topics::create("avro-outage", 1);
    let reg = RegistryDouble::start();
    let id = reg.register(&format!("{}-value", t.source), &avro::schema_text("pulse.avsc"));
    let input = pulses(2_000, "o", 1_795_341_600_000);
    // The outage starts before pulses sees its first Avro record and lasts 30 s.
    let outage = Duration::from_secs(30);
    let started = Instant::now();
    reg.outage_for(outage);
    // A JSON pulse first: its output is in an open transaction when the wait begins.
    let mut records = mixed(&input, id);
    records.swap(0, 1);
    produce(&t.source, &records);
    let _p = Proc::run(&t, &registry_config(&reg.url, "retry_max = \"60s\"\nretry_max_backoff = \"2s\""), GROUP_ONLY);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    let elapsed = started.elapsed();
    let refused = reg.counters.unavailable.load(Ordering::Relaxed);
    eprintln!("outage {outage:?}: all committed after {elapsed:?}; {refused} registry requests answered 503");
    assert!(refused > 0, "the stage hit the outage");
    assert!(elapsed >= outage);
    assert_eq!(read_all(&t.dlq).len(), 0, "nothing DLQ'd within the retry budget");
    let grouped = read_all(&t.grouped);
    assert_eq!(grouped.len(), 2_000);
    let ids: HashSet<String> = grouped.iter().map(|r| r.json()["pulse_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 2_000);
    assert_eq!(grouped_totals(&grouped), per_tenant(&input));
}

/// Final aggregates of an Avro aggregated topic, decoded with apache-avro and the
/// schema registered under `<topic>-value`, keyed like [`fold`]; all revisions.
fn avro_aggregates(reg: &RegistryDouble, topic: &str) -> Vec<HashMap<String, Value>> {
    let (registered_id, _) = reg.latest(&format!("{topic}-value")).expect("aggregate schema registered under <topic>-value");
    read_all(topic)
        .iter()
        .map(|r| {
            let (id, v) = avro::decode(&r.value, |id| reg.schema(id));
            assert_eq!(id, registered_id);
            avro::fields(v)
        })
        .collect()
}

#[test]
fn avro_output_round_trips_to_the_json_values() {
    let avro_t = Topics::create("avro-out", 1);
    let json_t = Topics::create("json-out", 1);
    let reg = RegistryDouble::start();
    let id = reg.register(&format!("{}-value", avro_t.source), &avro::schema_text("pulse.avsc"));
    let reg_json_id = reg.register(&format!("{}-value", json_t.source), &avro::schema_text("pulse.avsc"));
    assert_eq!(id, reg_json_id);
    let base = (now_ms() / 60_000 - 10) * 60_000;
    let mut input = pulses(600, "r", base);
    for (i, p) in input.iter_mut().enumerate() {
        p.at = base + i as i64 * 90; // in order, within the first minute
    }
    // One pulse per tenant at base + 70 s closes every window of the first minute.
    let push: Vec<P> = (0..10)
        .map(|i| P { id: format!("push-{i}"), tenant: format!("tenant-{i}"), sku: "clock".into(), unit: "tick".into(), amount: Decimal::ONE, at: base + 70 * SECOND })
        .collect();
    let all: Vec<P> = input.iter().chain(&push).cloned().collect();
    produce(&avro_t.source, &mixed(&all, id));
    produce(&json_t.source, &mixed(&all, id));

    let cfg = format!("{}{}", config("30s", "1h"), registry_config(&reg.url, ""));
    let _a = Proc::run(&avro_t, &format!("output_format = \"avro\"\n{cfg}"), &[]);
    let _j = Proc::run(&json_t, &cfg, &[]);
    wait_pipeline_done(&avro_t);
    wait_pipeline_done(&json_t);

    // Grouped pulses: Confluent wire format under <grouped>-value, the input's values.
    let (grouped_id, _) = reg.latest(&format!("{}-value", avro_t.grouped)).expect("grouped schema registered");
    let grouped = read_all(&avro_t.grouped);
    assert_eq!(grouped.len(), all.len());
    let by_id: HashMap<&str, &P> = all.iter().map(|p| (p.id.as_str(), p)).collect();
    for r in &grouped {
        let (sid, v) = avro::decode(&r.value, |id| reg.schema(id));
        assert_eq!(sid, grouped_id);
        let f = avro::fields(v);
        let Value::String(pid) = &f["pulse_id"] else { panic!("pulse_id") };
        let p = by_id[pid.as_str()];
        assert_eq!(f["used_amount"], Value::String(p.amount.to_string()));
        assert_eq!(f["event_time"], Value::TimestampMillis(p.at));
        assert_eq!(f["tenant_id"], Value::String(p.tenant.clone()));
        assert_eq!(r.key_str(), p.tenant);
    }

    // Aggregates: the Avro run decodes to the JSON run's values, field by field
    // (emitted_at is wall-clock time of each run), and both match the fold.
    let json_records: Vec<serde_json::Value> = read_all(&json_t.aggregated).iter().map(|r| r.json()).collect();
    let avro_records = avro_aggregates(&reg, &avro_t.aggregated);
    assert!(!avro_records.is_empty());
    let key_of_json = |v: &serde_json::Value| (v["aggregate_id"].as_str().unwrap().to_owned(), v["revision"].as_u64().unwrap() as i64);
    let json_by_key: HashMap<(String, i64), &serde_json::Value> = json_records.iter().map(|v| (key_of_json(v), v)).collect();
    let mut finals: BTreeMap<AggKey, Expect> = BTreeMap::new();
    let mut compared = 0;
    for f in &avro_records {
        let s = |k: &str| match &f[k] {
            Value::String(s) => s.clone(),
            other => panic!("{k} is {other:?}"),
        };
        let ms = |k: &str| match &f[k] {
            Value::TimestampMillis(n) => *n,
            other => panic!("{k} is {other:?}"),
        };
        let Value::Long(revision) = f["revision"] else { panic!("revision") };
        let Value::Long(count) = f["pulse_count"] else { panic!("pulse_count") };
        let Value::Boolean(is_final) = f["final"] else { panic!("final") };
        // The JSON run emits interim records on its own schedule; finals always match.
        if let Some(j) = json_by_key.get(&(s("aggregate_id"), revision)) {
            for k in ["tenant_id", "product_sku", "use_unit", "window", "total_amount", "min_amount", "max_amount"] {
                assert_eq!(j[k].as_str().unwrap(), s(k), "{k}");
            }
            for k in ["window_start", "window_end", "first_event_time", "last_event_time"] {
                assert_eq!(j[k].as_str().unwrap(), rfc3339(ms(k)), "{k}");
            }
            assert_eq!((j["pulse_count"].as_i64().unwrap(), j["final"].as_bool().unwrap()), (count, is_final));
            compared += 1;
        } else {
            assert!(!is_final, "final aggregate {} rev {revision} missing from the JSON run", s("aggregate_id"));
        }
        if is_final {
            let key = (s("tenant_id"), s("product_sku"), s("use_unit"), s("window"), ms("window_start"));
            let d = |k: &str| Decimal::from_str(&s(k)).unwrap();
            finals.insert(key, Expect { total: d("total_amount"), count: count as u64, min: d("min_amount"), max: d("max_amount") });
        }
    }
    let expected = fold(&all, WINDOWS, base + 70 * SECOND - 5 * SECOND);
    assert!(!expected.is_empty());
    for (k, e) in &expected {
        assert_eq!(finals.get(k), Some(e), "aggregate {k:?}");
    }
    let json_finals = json_records.iter().filter(|v| v["final"].as_bool().unwrap()).count();
    let avro_finals = avro_records.iter().filter(|f| f["final"] == Value::Boolean(true)).count();
    assert_eq!(avro_finals, json_finals);
    eprintln!("{} Avro aggregates ({avro_finals} final), {compared} compared field by field with the JSON run; {} expected finals", avro_records.len(), expected.len());
}

#[test]
fn stub_produces_avro_through_the_registry() {
    let t = Topics::create("avro-stub", PARTITIONS);
    let reg = RegistryDouble::start();
    let status = std::process::Command::new(pulses_bin())
        .arg("stub")
        .args(t.flags())
        .args(["--format", "avro", "--schema-registry-url", &reg.url, "--count", "1000", "--tenants", "7", "--seed", "5"])
        .status()
        .expect("run stub");
    assert!(status.success());
    // Registered under TopicNameStrategy, the very schemas/pulse.avsc.
    let (id, schema) = reg.latest(&format!("{}-value", t.source)).expect("pulse schema registered");
    assert_eq!(avro::parse(&schema), avro::parse(&avro::schema_text("pulse.avsc")));
    let mut want: BTreeMap<String, (Decimal, usize)> = BTreeMap::new();
    let input = read_all(&t.source);
    assert_eq!(input.len(), 1000);
    for r in &input {
        let (sid, v) = avro::decode(&r.value, |id| reg.schema(id));
        assert_eq!(sid, id);
        let f = avro::fields(v);
        let (Value::String(tenant), Value::String(amount)) = (&f["tenant_id"], &f["used_amount"]) else { panic!("{f:?}") };
        let e = want.entry(tenant.clone()).or_default();
        e.0 += Decimal::from_str(amount).unwrap();
        e.1 += 1;
    }
    let _p = Proc::run(&t, &registry_config(&reg.url, ""), GROUP_ONLY);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    assert_eq!(grouped_totals(&read_all(&t.grouped)), want);
    assert_eq!(want.len(), 7);
}

#[test]
fn check_validates_the_schemas() {
    let check = |dir: &std::path::Path| {
        std::process::Command::new(pulses_bin()).args(["check", "--schemas"]).arg(dir).output().expect("run check")
    };
    let ok = check(&repo_root().join("schemas"));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("schemas OK"));
    let dir = tempfile::tempdir().unwrap();
    for f in ["pulse.avsc", "grouped_pulse.avsc", "window_aggregate.avsc"] {
        std::fs::copy(repo_root().join("schemas").join(f), dir.path().join(f)).unwrap();
    }
    let grouped = avro::schema_text("grouped_pulse.avsc").replace(r#""name": "used_amount", "type": "string""#, r#""name": "used_amount", "type": "double""#);
    std::fs::write(dir.path().join("grouped_pulse.avsc"), grouped).unwrap();
    let bad = check(dir.path());
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("grouped_pulse.avsc: field used_amount cannot hold pulse field used_amount"), "{err}");
}

#[test]
fn an_outage_beyond_the_retry_budget_dlqs_as_registry_unavailable_then_recovers() {
    let t = Topics::create("avro-outage-long", 1);
    let reg = RegistryDouble::start();
    let schema_text = avro::schema_text("pulse.avsc");
    let id = reg.register(&format!("{}-value", t.source), &schema_text);
    let schema = avro::parse(&schema_text);
    let first = pulses(50, "down", 1_795_341_600_000);
    let json_too = pulses(50, "json", 1_795_341_600_000);
    // Longer than the 3 s budget below, and than the group join.
    reg.outage_for(Duration::from_secs(20));
    let mut records: Vec<(Option<Vec<u8>>, Vec<u8>)> = first.iter().map(|p| (None, avro::pulse(&schema, id, p))).collect();
    records.extend(json_too.iter().map(|p| (None, p.json())));
    produce(&t.source, &records);
    let cfg = registry_config(&reg.url, "retry_max = \"3s\"\nretry_max_backoff = \"1s\"");
    let _p = Proc::run(&t, &cfg, GROUP_ONLY);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    // The Avro pulses went to the DLQ with their bytes; JSON needs no registry.
    let dlq = read_all(&t.dlq);
    assert_eq!(dlq.len(), 50);
    for r in &dlq {
        assert_eq!(r.headers["error.reason"], "registry_unavailable", "{}", r.headers["error.detail"]);
        assert_eq!(r.value[0], 0);
    }
    let dlq_bytes: HashSet<Vec<u8>> = dlq.iter().map(|r| r.value.clone()).collect();
    assert_eq!(dlq_bytes, first.iter().map(|p| avro::pulse(&schema, id, p)).collect());
    assert_eq!(grouped_totals(&read_all(&t.grouped)), per_tenant(&json_too));

    // Once the registry is back, Avro pulses are grouped again.
    let later = pulses(50, "up", 1_795_341_600_000);
    wait_for("the outage to end", DEADLINE, || (reg.outage_until_passed()).then_some(()));
    produce(&t.source, &later.iter().map(|p| (None, avro::pulse(&schema, id, p))).collect::<Vec<_>>());
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    let all_json: Vec<P> = json_too.iter().chain(&later).cloned().collect();
    assert_eq!(grouped_totals(&read_all(&t.grouped)), per_tenant(&all_json));
    assert_eq!(read_all(&t.dlq).len(), 50);
}

#[test]
fn sigterm_during_a_registry_wait_commits_up_to_the_waiting_record() {
    let t = Topics::create("avro-sigterm", 1);
    let reg = RegistryDouble::start();
    let schema_text = avro::schema_text("pulse.avsc");
    let id = reg.register(&format!("{}-value", t.source), &schema_text);
    let schema = avro::parse(&schema_text);
    let ps = pulses(3, "s", 1_795_341_600_000);
    reg.outage_for(Duration::from_secs(600));
    // JSON, Avro (waits for the registry), JSON.
    produce(&t.source, &[(None, ps[0].json()), (None, avro::pulse(&schema, id, &ps[1])), (None, ps[2].json())]);
    let cfg = registry_config(&reg.url, "retry_max = \"60s\"\nretry_max_backoff = \"1s\"");
    let mut p = Proc::run(&t, &cfg, GROUP_ONLY);
    // The pulse before the waiting record was committed when the wait began.
    wait_for("the first pulse grouped", DEADLINE, || (read_all(&t.grouped).len() == 1).then_some(()));
    wait_for("the stage to be waiting", DEADLINE, || (reg.counters.unavailable.load(Ordering::Relaxed) >= 2).then_some(()));
    let status = p.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(committed(&format!("{}.group", t.app), &t.source).get(&0).copied(), Some(1), "committed up to the waiting record");
    assert_eq!(read_all(&t.dlq).len(), 0);

    // Registry back, same replica again: the rest, exactly once.
    reg.outage_for(Duration::ZERO);
    let _p2 = Proc::run_in(&t, &cfg, GROUP_ONLY, p.into_state());
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    let grouped = read_all(&t.grouped);
    // Sorted: the three pulses may land in different grouped partitions.
    let mut ids: Vec<String> = grouped.iter().map(|r| r.json()["pulse_id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, vec!["s-0", "s-1", "s-2"], "each pulse grouped exactly once");
}

#[test]
fn without_auto_register_the_subjects_latest_schema_is_used() {
    let t = Topics::create("avro-noreg", 1);
    let reg = RegistryDouble::start();
    produce(&t.source, &pulses(20, "n", 1_795_341_600_000).iter().map(|p| (None, p.json())).collect::<Vec<_>>());
    let cfg = format!("output_format = \"avro\"\n{}", registry_config(&reg.url, "auto_register = false"));
    // Nothing registered under <grouped>-value: a clear error at start, not a guess.
    let mut p = Proc::run(&t, &cfg, GROUP_ONLY);
    let status = wait_for("pulses to fail", DEADLINE, || p.child.try_wait().expect("try_wait"));
    assert!(!status.success());
    assert!(p.log().contains(&format!("subject {}-value", t.grouped)), "{}", p.log());
    assert_eq!(reg.counters.register.load(Ordering::Relaxed), 0, "nothing registered by pulses");

    // Registered by an operator: used as it is.
    let id = reg.register(&format!("{}-value", t.grouped), &avro::schema_text("grouped_pulse.avsc"));
    let _p = Proc::run(&t, &cfg, GROUP_ONLY);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    let grouped = read_all(&t.grouped);
    assert_eq!(grouped.len(), 20);
    for r in &grouped {
        assert_eq!(avro::decode(&r.value, |id| reg.schema(id)).0, id);
    }
    assert_eq!(reg.counters.register.load(Ordering::Relaxed), 0, "pulses registered nothing");
}

/// A final aggregate's (total, count, start, end).
type Final = (Decimal, i64, i64, i64);

/// Latest final revision of every aggregate of an Avro topic, by aggregate_id.
fn avro_finals_by_id(reg: &RegistryDouble, topic: &str) -> BTreeMap<String, Final> {
    let mut latest: BTreeMap<String, (i64, Final)> = BTreeMap::new();
    for f in avro_aggregates(reg, topic) {
        let (Value::String(id), Value::Long(rev), Value::Boolean(is_final)) = (&f["aggregate_id"], &f["revision"], &f["final"]) else { panic!("{f:?}") };
        let (Value::String(total), Value::Long(count), Value::TimestampMillis(start), Value::TimestampMillis(end)) =
            (&f["total_amount"], &f["pulse_count"], &f["window_start"], &f["window_end"]) else { panic!("{f:?}") };
        if *is_final && latest.get(id).is_none_or(|(r, _)| r < rev) {
            latest.insert(id.clone(), (*rev, (Decimal::from_str(total).unwrap(), *count, *start, *end)));
        }
    }
    latest.into_iter().map(|(id, (_, v))| (id, v)).collect()
}

/// With Avro input and `output_format = "avro"`: the replay decodes the Avro pulses as
/// stage 1 does and writes Avro aggregates (registered under the replay topic's
/// subject) equal to the live ones; pulses beyond retention reach the late topic as
/// Avro grouped pulses, like the grouped topic's.
#[test]
fn replay_and_the_late_topic_speak_the_output_format() {
    let t = Topics::create("avro-replay", 2);
    let reg = RegistryDouble::start();
    let id = reg.register(&format!("{}-value", t.source), &avro::schema_text("pulse.avsc"));
    let base = (now_ms() / 60_000 - 5) * 60_000;
    let mut input = pulses(1_200, "rp", base);
    for (i, p) in input.iter_mut().enumerate() {
        p.at = base + i as i64 * 100; // two minutes of event time
    }
    produce(&t.source, &mixed(&input, id));
    let cfg = format!("output_format = \"avro\"\n{}{}", config("1h", "2s"), registry_config(&reg.url, ""));
    let live = Proc::run(&t, &cfg, &[]);
    wait_pipeline_done(&t);
    let all_windows = fold(&input, WINDOWS, i64::MAX).len();
    wait_for("every window final", DEADLINE, || (avro_finals_by_id(&reg, &t.aggregated).len() == all_windows).then_some(()));

    // Two hours before the others, after them: beyond the 1 h retention.
    let too_late: Vec<P> = (0..5)
        .map(|i| P { id: format!("old{i}"), tenant: "tenant-1".into(), sku: "storage.standard".into(), unit: "GB".into(),
            amount: Decimal::new(i + 1, 0), at: base - 7_200 * SECOND + i })
        .collect();
    produce(&t.source, &mixed(&too_late, id));
    wait_pipeline_done(&t);
    let (late_id, _) = reg.latest(&format!("{}-value", t.late)).expect("late schema registered under <late>-value");
    let late = read_all(&t.late);
    let mut late_ids: Vec<String> = late.iter().map(|r| {
        assert_eq!(r.headers["late.reason"], "beyond_retention");
        let (sid, v) = avro::decode(&r.value, |id| reg.schema(id));
        assert_eq!(sid, late_id, "late records carry the late topic's schema id");
        let Value::String(pid) = &avro::fields(v)["pulse_id"] else { panic!("pulse_id") };
        pid.clone()
    }).collect();
    late_ids.sort();
    assert_eq!(late_ids, (0..5).map(|i| format!("old{i}")).collect::<Vec<_>>());

    let (t0, t1) = (base + 60 * SECOND, base + 115 * SECOND);
    let out = format!("{}.replay", t.app);
    let cfg_path = live.state_dir.path().join("replay.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let (stdout, _) = run_replay(&t, &cfg_path, &["--from", &t0.to_string(), "--to", &t1.to_string()], &out);
    assert!(stdout.contains("(0 invalid, 0 duplicates, 5 late)"), "every Avro pulse decoded: {stdout}");
    let replayed = avro_finals_by_id(&reg, &out);
    let live_inside: BTreeMap<_, _> = avro_finals_by_id(&reg, &t.aggregated).into_iter().filter(|(_, v)| v.2 >= t0 && v.3 <= t1).collect();
    // Counted independently: the fold's windows inside [T0, T1).
    let want = fold(&input, WINDOWS, t1).into_iter().filter(|(k, _)| k.4 >= t0).count();
    assert_eq!(live_inside.len(), want);
    assert_eq!(replayed, live_inside, "replayed Avro aggregates = live Avro aggregates inside [T0, T1)");
    eprintln!("{} Avro windows replayed identically", replayed.len());
}
