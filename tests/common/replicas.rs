//! What the multi-replica crash tests share: reading a replica's log (its latest life,
//! the grouped partitions its stage 2 owns), their pulses, and the latest committed
//! finals with duplicate revisions counted.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;

use super::agg::*;
use super::*;

/// The part of a replica's log written by its latest life.
pub fn latest_life(log: &str) -> &str {
    log.rfind("stage 2 (aggregate) started").map_or(log, |i| &log[i..])
}

/// The grouped partitions stage 2 of a life (`log`) owns now: its assignments less
/// its revocations and losses, in order (`partitions=[..]` of those lines).
pub fn stage2_partitions(log: &str) -> BTreeSet<i32> {
    let mut owned = BTreeSet::new();
    for line in log.lines().filter(|l| l.contains("aggregate")) {
        let Some(list) = line.split("partitions=[").nth(1).and_then(|r| r.split(']').next()) else { continue };
        let listed = list.split(',').filter_map(|p| p.trim().parse::<i32>().ok());
        if line.contains("partitions assigned") {
            owned.extend(listed);
        } else if line.contains("partitions revoked") || line.contains("partitions lost") {
            listed.for_each(|p| {
                owned.remove(&p);
            });
        }
    }
    owned
}

pub fn pulses(prefix: &str, tenants: usize, per_tenant: i64, base: i64, step_ms: i64) -> Vec<P> {
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

/// Latest revision of every final aggregate among `records`, and how many
/// (aggregate_id, revision) pairs occur more than once.
pub fn latest_committed_finals(records: &[Record]) -> (BTreeMap<AggKey, Expect>, usize) {
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
