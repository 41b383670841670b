//! `pulses topology` of the shipped configuration, checked against the pipeline as the
//! SPEC (§1, §2, §4) describes it. The expected chart is written by hand.

mod common;

use std::process::Command;

use common::*;

fn topology(args: &[&str]) -> String {
    let out = Command::new(pulses_bin())
        .arg("topology")
        .args(["--config", "topology/pulses.toml"])
        .args(args)
        .current_dir(repo_root())
        .env_clear()
        .output()
        .expect("run pulses topology");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// SPEC: source.pulses → stage 1 → tenant.grouped.pulses (invalid → source.pulses.dlq);
/// stage 2 keeps windows (inflight 1s, postflight 10s, minute 1m, hour 1h; grace 5s,
/// retention 1h) in RocksDB with the changelog `<app>-windows-changelog` and emits to
/// tenant.aggregated.pulses.amount, too-late pulses to tenant.late.pulses.
const DEFAULT_MERMAID: &str = r#"flowchart LR
    source[/"source.pulses"/]
    group["stage 1: group<br/>validate, key by tenant_id"]
    grouped[/"tenant.grouped.pulses"/]
    dlq[/"source.pulses.dlq"/]
    aggregate["stage 2: aggregate<br/>windows: inflight 1s, postflight 10s, minute 1m, hour 1h<br/>grace 5s, retention 1h"]
    store[("RocksDB window store<br/>one per tenant.grouped.pulses partition")]
    changelog[/"pulses-windows-changelog"/]
    aggregated[/"tenant.aggregated.pulses.amount"/]
    late[/"tenant.late.pulses"/]
    source --> group
    group -->|valid| grouped
    group -->|invalid| dlq
    grouped --> aggregate
    aggregate <-->|state| store
    aggregate -->|state changes| changelog
    changelog -.->|restore| store
    aggregate -->|window aggregates| aggregated
    aggregate -->|too late| late
"#;

#[test]
fn mermaid_of_the_default_topology() {
    assert_eq!(topology(&["--format", "mermaid"]), DEFAULT_MERMAID);
}

#[test]
fn topology_follows_flags_and_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(&file, "application_id = \"billing\"\n[aggregate]\ngrace = \"2s\"\n[[windows]]\nname = \"day\"\nsize = \"1d\"\nemit = \"updates\"\n").unwrap();
    let out = Command::new(pulses_bin())
        .args(["topology", "--config"])
        .arg(&file)
        .args(["--source-topic", "raw.usage"])
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("raw.usage -> tenant.grouped.pulses"), "{text}");
    assert!(text.contains("  billing-windows-changelog  compacted"), "{text}");
    assert!(text.contains("grace 2s"), "{text}");
    assert!(text.contains("  day              1d  emit updates\n"), "{text}");
    assert!(!text.contains("minute"), "only the configured windows: {text}");
}

#[test]
fn readme_shows_the_default_topology() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    assert!(readme.contains(&format!("```mermaid\n{DEFAULT_MERMAID}```")), "README's mermaid block is out of date");
}
