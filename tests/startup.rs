//! Start-up behaviour that needs no broker: JSON logs, and a clear error when the
//! HTTP port cannot be bound.

mod common;

use std::process::Command;

use common::*;

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let out = Command::new(pulses_bin())
        .args(["--log-format", "json", "check", "--config", "/nonexistent/pulses.toml"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let first = stderr.lines().next().expect("a log line");
    let v: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{first:?} is not JSON: {e}"));
    assert_eq!(v["level"], "ERROR");
    assert!(v["fields"]["message"].as_str().unwrap().contains("/nonexistent/pulses.toml"), "{v}");
}

#[test]
fn a_taken_http_port_stops_the_start_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(pulses_bin())
        .args(["run", "--bootstrap-servers", "127.0.0.1:1", "--http-addr", &addr])
        .env_clear()
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains(&format!("error: cannot listen on {addr} (http_addr / --http-addr / PULSES_HTTP_ADDR)")), "{stderr}");
}
