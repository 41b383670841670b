//! The topology the processor runs, described once: [`Topology::of`] says which topics,
//! consumer groups, transactional ids, stores and changelog each stage uses; the stages
//! take their wiring from it (so does `pulses run`'s topic setup), and `pulses topology`
//! prints it as text for people or as a Mermaid flowchart for docs. The printout cannot
//! drift from what runs, since both read the same description of the same effective
//! [`Config`] (file, environment and flags).

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::window::{EmitMode, WindowSpec};

/// The whole processor.
#[derive(Debug, Clone)]
pub struct Topology {
    pub application_id: String,
    pub guarantee: &'static str,
    pub bootstrap_servers: String,
    pub source: String,
    pub group: GroupWiring,
    pub aggregate: AggregateWiring,
}

/// Stage 1: where a pulse enters.
#[derive(Debug, Clone)]
pub struct GroupWiring {
    /// Names its transactional id (`<application_id>-<name>-<process id>`).
    pub name: &'static str,
    pub input: String,
    pub consumer_group: String,
    /// Valid pulses, keyed by tenant.
    pub grouped: String,
    /// Invalid records, original bytes, with the reason.
    pub dlq: String,
}

/// Stage 2: where a pulse is counted and aggregates leave.
#[derive(Debug, Clone)]
pub struct AggregateWiring {
    pub name: &'static str,
    pub input: String,
    pub consumer_group: String,
    pub aggregated: String,
    /// Pulses counted in no window (beyond retention, or not countable).
    pub late: String,
    /// The stores' changelog: partition p holds store p's changes.
    pub changelog: String,
    pub state_dir: PathBuf,
    pub checkpoint_dir: PathBuf,
    pub checkpoint_interval: Duration,
    pub windows: Vec<WindowSpec>,
    pub grace: Duration,
    pub retention: Duration,
    pub idle_timeout: Duration,
    pub dedupe_horizon: Duration,
}

/// `pulses rate` (run beside the processor): where final aggregates are priced and
/// charges leave. Its ledger is a store per aggregated-topic partition, like stage 2's
/// windows; the aggregated topic is keyed by tenant, so a tenant's balances live in one
/// partition's store.
#[derive(Debug, Clone)]
pub struct RateWiring {
    pub name: &'static str,
    pub input: String,
    pub consumer_group: String,
    pub charges: String,
    pub alerts: String,
    /// The ledger stores' changelog: partition p holds store p's changes.
    pub changelog: String,
    pub state_dir: PathBuf,
    /// Where the live stores' checkpoints would be (the ledger writes none: it is small
    /// and restored from its changelog; a checkpoint found there still seeds a store).
    pub checkpoint_dir: PathBuf,
}

impl RateWiring {
    /// What `pulses rate` with `cfg` runs.
    pub fn of(cfg: &Config) -> Self {
        let t = &cfg.topics;
        Self {
            name: "rate",
            input: t.aggregated.clone(),
            consumer_group: format!("{}.rate", cfg.group_id.as_deref().unwrap_or(&cfg.application_id)),
            charges: t.charges.clone(),
            alerts: t.alerts.clone(),
            changelog: format!("{}-rate-ledger-changelog", cfg.application_id),
            state_dir: cfg.state_dir.join(format!("{}.rate", cfg.application_id)),
            checkpoint_dir: cfg.checkpoint_root().join(format!("{}.rate", cfg.application_id)),
        }
    }
}

impl Topology {
    /// What `pulses run` with `cfg` runs.
    pub fn of(cfg: &Config) -> Self {
        let t = &cfg.topics;
        let a = &cfg.aggregate;
        Self {
            application_id: cfg.application_id.clone(),
            guarantee: cfg.processing_guarantee.as_str(),
            bootstrap_servers: cfg.bootstrap_servers.clone(),
            source: t.source.clone(),
            group: GroupWiring {
                name: "group",
                input: t.source.clone(),
                consumer_group: cfg.group_stage_group_id(),
                grouped: t.grouped.clone(),
                dlq: t.dlq.clone(),
            },
            aggregate: AggregateWiring {
                name: "aggregate",
                input: t.grouped.clone(),
                consumer_group: cfg.aggregate_stage_group_id(),
                aggregated: t.aggregated.clone(),
                late: t.late.clone(),
                changelog: cfg.changelog_topic(),
                state_dir: cfg.state_dir.join(&cfg.application_id),
                checkpoint_dir: cfg.checkpoint_root().join(&cfg.application_id),
                checkpoint_interval: cfg.checkpoint_interval,
                windows: cfg.windows.clone(),
                grace: a.grace,
                retention: a.retention,
                idle_timeout: a.idle_timeout,
                dedupe_horizon: a.dedupe_horizon,
            },
        }
    }
}

/// The transactional id of a stage thread's producer, one per replica (its process
/// id is kept in its state dir).
pub fn transactional_ids(application_id: &str, stage: &str) -> String {
    crate::state::instance::transactional_id_of(application_id, stage, "<process id>")
}

/// Plain text: one section per kind of element.
pub fn text(topo: &Topology) -> String {
    let (g, a) = (&topo.group, &topo.aggregate);
    let app = &topo.application_id;
    let mut s = String::new();
    let _ = writeln!(s, "pulses topology (application id {app}, {}, bootstrap {})", topo.guarantee, topo.bootstrap_servers);
    let _ = writeln!(s, "\nsources");
    let _ = writeln!(s, "  {}  pulses (JSON, or Avro in Confluent wire format); any key", topo.source);
    let _ = writeln!(s, "\nstages");
    let _ = writeln!(s, "  1 {:<10} {} -> {} (valid, key tenant_id) | {} (invalid, error.reason header)", g.name, g.input, g.grouped, g.dlq);
    let _ = writeln!(s, "               consumer group {}, transactional id {}", g.consumer_group, transactional_ids(app, g.name));
    let _ = writeln!(s, "  2 {:<10} {} -> {} (window aggregates) | {} (too late or not countable)", a.name, a.input, a.aggregated, a.late);
    let _ = writeln!(s, "               consumer group {}, transactional id {}", a.consumer_group, transactional_ids(app, a.name));
    let _ = writeln!(s, "\nstores");
    let _ = writeln!(s, "  windows      RocksDB, one per {} partition: {}/{}-<partition>", a.input, a.state_dir.display(), a.input);
    let _ = writeln!(s, "               checkpoints every {} under {}", human(a.checkpoint_interval), a.checkpoint_dir.display());
    let _ = writeln!(s, "\nchangelogs");
    let _ = writeln!(s, "  {}  compacted; partition p = store of {} partition p", a.changelog, a.input);
    let _ = writeln!(s, "\nsinks");
    let _ = writeln!(s, "  {}  window aggregates, key tenant_id", a.aggregated);
    let _ = writeln!(s, "  {}  pulses too late for a correction, or not countable; late.reason header", a.late);
    let _ = writeln!(s, "  {}  invalid pulses, original bytes, error.reason header", g.dlq);
    let _ = writeln!(s, "\nwindows (tumbling, event time; grace {}, retention {}, idle timeout {}, dedupe horizon {})",
        human(a.grace), human(a.retention), human(a.idle_timeout), human(a.dedupe_horizon));
    for w in &a.windows {
        let _ = writeln!(s, "  {:<12} {:>6}  emit {}", w.name, human(w.size), emit(w.emit));
    }
    s
}

/// A Mermaid flowchart (left to right): topics are parallelograms, stages boxes,
/// the state store a cylinder.
pub fn mermaid(topo: &Topology) -> String {
    let (g, a) = (&topo.group, &topo.aggregate);
    let windows: Vec<String> = a.windows.iter().map(|w| format!("{} {}", w.name, human(w.size))).collect();
    let mut s = String::from("flowchart LR\n");
    let mut node = |id: &str, shape: (&str, &str), label: &str| {
        let _ = writeln!(s, "    {id}{}\"{}\"{}", shape.0, label.replace('"', "#quot;"), shape.1);
    };
    const TOPIC: (&str, &str) = ("[/", "/]");
    const STAGE: (&str, &str) = ("[", "]");
    const STORE: (&str, &str) = ("[(", ")]");
    node("source", TOPIC, &g.input);
    node("group", STAGE, &format!("stage 1: {}<br/>validate, key by tenant_id", g.name));
    node("grouped", TOPIC, &g.grouped);
    node("dlq", TOPIC, &g.dlq);
    node("aggregate", STAGE, &format!(
        "stage 2: {}<br/>windows: {}<br/>grace {}, retention {}",
        a.name, windows.join(", "), human(a.grace), human(a.retention)
    ));
    node("store", STORE, &format!("RocksDB window store<br/>one per {} partition", a.input));
    node("changelog", TOPIC, &a.changelog);
    node("aggregated", TOPIC, &a.aggregated);
    node("late", TOPIC, &a.late);
    for edge in [
        "source --> group",
        "group -->|valid| grouped",
        "group -->|invalid| dlq",
        "grouped --> aggregate",
        "aggregate <-->|state| store",
        "aggregate -->|state changes| changelog",
        "changelog -.->|restore| store",
        "aggregate -->|window aggregates| aggregated",
        "aggregate -->|too late| late",
    ] {
        s.push_str("    ");
        s.push_str(edge);
        s.push('\n');
    }
    s
}

fn emit(mode: EmitMode) -> &'static str {
    match mode {
        EmitMode::Final => "final",
        EmitMode::Updates => "updates",
    }
}

/// A duration in the config file's notation: the largest unit that divides it.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_duration;

    #[test]
    fn human_durations_round_trip() {
        for s in ["250ms", "5s", "90s", "1m", "1h", "1d", "0ms"] {
            assert_eq!(human(parse_duration(s).unwrap()), s);
        }
    }

    #[test]
    fn text_lists_every_window_and_topic() {
        let cfg = Config::default();
        let t = text(&Topology::of(&cfg));
        for needle in ["source.pulses", "tenant.grouped.pulses", "pulses-windows-changelog", "tenant.late.pulses", "hour"] {
            assert!(t.contains(needle), "{needle} missing:\n{t}");
        }
        assert!(t.contains("  minute           1m  emit final\n"), "{t}");
    }
}
