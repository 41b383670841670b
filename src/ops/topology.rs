//! The topology of a configuration: sources, stages, stores, changelogs, sinks and
//! windows, as text for people and as a Mermaid flowchart for docs. Built from the
//! effective [`Config`] alone, so it shows what `pulses run` with the same file,
//! environment and flags would run.

use std::fmt::Write;
use std::time::Duration;

use crate::config::Config;
use crate::window::EmitMode;

/// Plain text: one section per kind of element.
pub fn text(cfg: &Config) -> String {
    let t = &cfg.topics;
    let a = &cfg.aggregate;
    let app = &cfg.application_id;
    let changelog = cfg.changelog_topic();
    let mut s = String::new();
    let _ = writeln!(s, "pulses topology (application id {app}, {}, bootstrap {})", cfg.processing_guarantee.as_str(), cfg.bootstrap_servers);
    let _ = writeln!(s, "\nsources");
    let _ = writeln!(s, "  {}  pulses (JSON, or Avro in Confluent wire format); any key", t.source);
    let _ = writeln!(s, "\nstages");
    let _ = writeln!(s, "  1 group      {} -> {} (valid, key tenant_id) | {} (invalid, error.reason header)", t.source, t.grouped, t.dlq);
    let _ = writeln!(s, "               consumer group {}, transactional ids {app}-group-<partition>", cfg.group_stage_group_id());
    let _ = writeln!(s, "  2 aggregate  {} -> {} (window aggregates) | {} (too late or not countable)", t.grouped, t.aggregated, t.late);
    let _ = writeln!(s, "               consumer group {}, transactional ids {app}-aggregate-<partition>", cfg.aggregate_stage_group_id());
    let _ = writeln!(s, "\nstores");
    let _ = writeln!(s, "  windows      RocksDB, one per {} partition: {}/{app}/{}-<partition>", t.grouped, cfg.state_dir.display(), t.grouped);
    let _ = writeln!(s, "               checkpoints every {} under {}/{app}", human(cfg.checkpoint_interval), cfg.checkpoint_root().display());
    let _ = writeln!(s, "\nchangelogs");
    let _ = writeln!(s, "  {changelog}  compacted; partition p = store of {} partition p", t.grouped);
    let _ = writeln!(s, "\nsinks");
    let _ = writeln!(s, "  {}  window aggregates, key tenant_id", t.aggregated);
    let _ = writeln!(s, "  {}  pulses too late for a correction, or not countable; late.reason header", t.late);
    let _ = writeln!(s, "  {}  invalid pulses, original bytes, error.reason header", t.dlq);
    let _ = writeln!(s, "\nwindows (tumbling, event time; grace {}, retention {}, idle timeout {}, dedupe horizon {})",
        human(a.grace), human(a.retention), human(a.idle_timeout), human(a.dedupe_horizon));
    for w in &cfg.windows {
        let _ = writeln!(s, "  {:<12} {:>6}  emit {}", w.name, human(w.size), emit(w.emit));
    }
    s
}

/// A Mermaid flowchart (left to right): topics are parallelograms, stages boxes,
/// the state store a cylinder.
pub fn mermaid(cfg: &Config) -> String {
    let t = &cfg.topics;
    let a = &cfg.aggregate;
    let windows: Vec<String> = cfg.windows.iter().map(|w| format!("{} {}", w.name, human(w.size))).collect();
    let mut s = String::from("flowchart LR\n");
    let mut node = |id: &str, shape: (&str, &str), label: &str| {
        let _ = writeln!(s, "    {id}{}\"{}\"{}", shape.0, label.replace('"', "#quot;"), shape.1);
    };
    const TOPIC: (&str, &str) = ("[/", "/]");
    const STAGE: (&str, &str) = ("[", "]");
    const STORE: (&str, &str) = ("[(", ")]");
    node("source", TOPIC, &t.source);
    node("group", STAGE, "stage 1: group<br/>validate, key by tenant_id");
    node("grouped", TOPIC, &t.grouped);
    node("dlq", TOPIC, &t.dlq);
    node("aggregate", STAGE, &format!(
        "stage 2: aggregate<br/>windows: {}<br/>grace {}, retention {}",
        windows.join(", "), human(a.grace), human(a.retention)
    ));
    node("store", STORE, &format!("RocksDB window store<br/>one per {} partition", t.grouped));
    node("changelog", TOPIC, &cfg.changelog_topic());
    node("aggregated", TOPIC, &t.aggregated);
    node("late", TOPIC, &t.late);
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
        if ms >= size && ms % size == 0 {
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
        let t = text(&cfg);
        for needle in ["source.pulses", "tenant.grouped.pulses", "pulses-windows-changelog", "tenant.late.pulses", "hour"] {
            assert!(t.contains(needle), "{needle} missing:\n{t}");
        }
        assert!(t.contains("  minute           1m  emit final\n"), "{t}");
    }
}
