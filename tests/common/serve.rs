//! Driving `pulses serve` and `pulses keys` as users do: the CLI for keys, HTTP for
//! pulses (reqwest, a maintained client, not the code under test).

use std::time::Duration;

use super::agg::P;
use super::*;

/// `pulses keys <args>` for `t`'s application; its stdout, asserting success.
pub fn keys(t: &Topics, args: &[&str]) -> String {
    let (action, rest) = args.split_first().expect("a keys action");
    let out = Command::new(pulses_bin())
        .args(["keys", action])
        .args(t.flags())
        .args(rest)
        .output()
        .expect("run pulses keys");
    assert!(out.status.success(), "pulses keys {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A new key for `tenant` (admin if None): (id, secret).
pub fn create_key(t: &Topics, tenant: Option<&str>) -> (String, String) {
    let args: Vec<&str> = match tenant {
        Some(tenant) => vec!["create", "--tenant", tenant],
        None => vec!["create", "--admin"],
    };
    let v: serde_json::Value = serde_json::from_str(keys(t, &args).trim()).expect("create prints JSON");
    (v["id"].as_str().unwrap().to_owned(), v["secret"].as_str().unwrap().to_owned())
}

/// Starts `pulses serve` for `t` and waits until it is ready (keys loaded).
pub fn start_serve(t: &Topics, config_toml: &str) -> (Proc, String) {
    let p = Proc::start("serve", t, config_toml, &[], tempfile::tempdir().expect("tempdir"));
    let addr = p.wait_ready();
    (p, addr)
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().expect("http client")
}

/// The body of a batch of pulses, as a JSON array.
pub fn batch(pulses: &[P]) -> Vec<u8> {
    let mut body = b"[".to_vec();
    for (i, p) in pulses.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&p.json());
    }
    body.push(b']');
    body
}

/// POSTs `body` to `/v1/pulses` with `key`: (status, JSON answer).
pub fn post(client: &reqwest::blocking::Client, addr: &str, key: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let mut req = client.post(format!("http://{addr}/v1/pulses")).header("X-API-Key", key).header("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match req.body(body).send() {
        Ok(res) => {
            let status = res.status().as_u16();
            let text = res.text().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
        }
        // No answer (connection refused or reset): nothing was acknowledged.
        Err(e) => (0, serde_json::Value::String(e.to_string())),
    }
}
