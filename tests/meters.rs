//! Meters over CloudEvents (SPEC §10) against the real broker and the real binary:
//! - a bad `[[meters]]` entry is refused by `pulses check` and, at once, by `pulses run`,
//!   naming the problem and its line;
//! - `POST /api/v1/events` of `pulses serve` refuses bad input with the right status,
//!   reason and index and writes nothing, and a few hundred fuzzed bodies get no 5xx
//!   and leave it ready;
//! - CloudEvents produced with kcat are metered exactly: the one the meter cannot read
//!   is in the DLQ as sent, a re-sent event (same source and id) counts once, and the
//!   meter query answers the decimal sums computed here from the events, digit for
//!   digit;
//! - a replay with a meter added afterwards meters the history already in the log, and
//!   reproduces the live meter's windows;
//! - an event larger than a Kafka record may be is a 413 with nothing written, and the
//!   usage of an hour whose window is still open is answered from its closed minutes.
//!
//! Expected values come from the test's own events, parsed here as exact decimals from
//! the text as written: never from the code under test, never through an f64.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::agg::{now_ms, rfc3339, wait_pipeline_done};
use common::serve::{client, create_key, start_serve};
use common::*;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// Minute and hour windows that close soon after their input goes idle, a retention
/// long enough that events hours old correct windows instead of going late, and one
/// meter: the sum of `data.tokens` of `prompt` events, by `data.model`.
const CONFIG: &str = r#"
[aggregate]
grace = "2s"
retention = "7d"
idle_timeout = "2s"
max_batch_wait = "50ms"

[[windows]]
name = "minute"
size = "1m"

[[windows]]
name = "hour"
size = "1h"

[[meters]]
slug = "tokens_total"
event_type = "prompt"
aggregation = "sum"
value_property = "$.tokens"
group_by = { model = "$.model" }
"#;

/// The meter a replay adds: how many `prompt` events there were.
const PROMPTS_METER: &str = r#"
[[meters]]
slug = "prompts"
event_type = "prompt"
aggregation = "count"
"#;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

// ---------------------------------------------------------------------------------
// 1. Configuration
// ---------------------------------------------------------------------------------

/// The 1-based number of the `nth` (0-based) line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str, nth: usize) -> usize {
    text.lines().enumerate().filter(|(_, l)| l.starts_with(prefix)).nth(nth).map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("no line {nth} starting with {prefix:?} in {text}"))
}

/// Writes `text` to a file and runs `pulses check --config` on it: (exit code, stderr).
fn check(dir: &std::path::Path, name: &str, text: &str) -> (Option<i32>, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new(pulses_bin()).arg("check").arg("--config").arg(&path).output().expect("run pulses check");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `pulses run` on the config file `name` in `dir`, pointed at a port where no broker
/// listens (had it started, it would touch nothing): (exit code, stderr, how long it ran).
fn run_with(dir: &std::path::Path, name: &str) -> (Option<i32>, String, Duration) {
    let state = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = Command::new(pulses_bin())
        .arg("run")
        .arg("--config").arg(dir.join(name))
        .args(["--bootstrap-servers", "127.0.0.1:1", "--application-id", &unique("meters-bad-config")])
        .arg("--state-dir").arg(state.path())
        .args(["--http-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pulses run");
    let exited = wait_for("pulses run to exit on a bad configuration", Duration::from_secs(30), || child.try_wait().expect("try_wait"));
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (exited.code(), stderr, started.elapsed())
}

#[test]
fn check_and_run_refuse_a_bad_meter_naming_the_problem_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = check(dir.path(), "good.toml", CONFIG);
    assert_eq!(good.0, Some(0), "the test's own configuration is valid: {}", good.1);

    let meters_at = line_of(CONFIG, "[[meters]]", 0);
    let with_second_meter = format!("{CONFIG}{PROMPTS_METER}");
    let dup = format!("{with_second_meter}{}", PROMPTS_METER.replace("\"count\"", "\"sum\"\nvalue_property = \"$.tokens\""));
    // (file, what the message says, the line it names)
    let median = CONFIG.replace("aggregation = \"sum\"", "aggregation = \"median\"");
    let no_dollar = CONFIG.replace("\"$.tokens\"", "\"tokens\"");
    let descent = CONFIG.replace("\"$.tokens\"", "\"$..x\"");
    let bad_group = CONFIG.replace("\"$.model\"", "\"$.models[*]\"");
    let cases: Vec<(&str, String, Vec<&str>, usize)> = vec![
        // The value itself is pointed at.
        ("median.toml", median.clone(), vec!["unknown aggregation \"median\""], line_of(&median, "aggregation", 0)),
        // A JSONPath is checked where it is read: its own line, and the path named.
        ("no_dollar.toml", no_dollar.clone(), vec!["JSONPath \"tokens\"", "starts with $"], line_of(&no_dollar, "value_property", 0)),
        ("descent.toml", descent.clone(), vec!["JSONPath \"$..x\"", "one value per path"], line_of(&descent, "value_property", 0)),
        ("bad_group.toml", bad_group.clone(), vec!["JSONPath \"$.models[*]\""], line_of(&bad_group, "group_by", 0)),
        // Slugs are checked across the entries: the array's first line.
        ("dup.toml", dup, vec!["meter slug \"prompts\" is defined twice"], meters_at),
    ];
    for (name, text, says, line) in &cases {
        let (code, stderr) = check(dir.path(), name, text);
        assert_eq!(code, Some(1), "{name}: pulses check exits 1: {stderr}");
        for s in says {
            assert!(stderr.contains(s), "{name}: the message says {s:?}: {stderr}");
        }
        assert!(stderr.contains(&format!("line {line},")), "{name}: the message names line {line}: {stderr}");

        let (code, run_stderr, took) = run_with(dir.path(), name);
        assert_eq!(code, Some(1), "{name}: pulses run exits 1: {run_stderr}");
        assert!(took < Duration::from_secs(10), "{name}: pulses run exits at once (took {took:?})");
        for s in says {
            assert!(run_stderr.contains(s), "{name}: pulses run says {s:?}: {run_stderr}");
        }
        assert!(run_stderr.contains(&format!("line {line},")), "{name}: pulses run names line {line}: {run_stderr}");
    }
}

// ---------------------------------------------------------------------------------
// 2. HTTP: bad input, then fuzz
// ---------------------------------------------------------------------------------

/// A `prompt` CloudEvent's JSON text; `data` is inserted as written.
fn event_json(id: &str, source: &str, subject: &str, time: &str, data: &str) -> String {
    format!(r#"{{"specversion":"1.0","id":"{id}","source":"{source}","type":"prompt","subject":"{subject}","time":"{time}","data":{data}}}"#)
}

/// POSTs `body` to `/api/v1/events`: (status, body text); status 0 and the error when
/// nothing answered.
fn post_events(addr: &str, bearer: Option<&str>, content_type: Option<&str>, body: Vec<u8>) -> (u16, String) {
    let mut req = client().post(format!("http://{addr}/api/v1/events"));
    if let Some(key) = bearer {
        req = req.header("Authorization", format!("Bearer {key}"));
    }
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    match req.body(body).send() {
        Ok(res) => {
            let status = res.status().as_u16();
            (status, res.text().unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("a JSON answer ({e}): {text}"))
}

/// The `errors` of an `invalid_event` answer: (index, reason, detail).
fn event_errors(text: &str) -> Vec<(u64, String, String)> {
    let v = json_of(text);
    assert_eq!(v["error"], "invalid_event", "{text}");
    v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("errors: {text}"))
        .iter()
        .map(|e| (e["index"].as_u64().unwrap(), e["reason"].as_str().unwrap().to_owned(), e["detail"].as_str().unwrap().to_owned()))
        .collect()
}

/// Sends `head` and then `body` on a plain socket and returns the answer's text. A
/// server may answer before it has read the body (413): a client library can report
/// the reset that follows instead of the answer, a socket still reads it.
fn raw_request(addr: &str, head: String, body: Vec<u8>) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(head.as_bytes()).expect("write the head");
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&body);
    });
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let _ = s.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

const TEN_MB: usize = 10 * 1024 * 1024;

#[test]
fn bad_events_are_refused_with_their_reasons_nothing_is_written_and_fuzz_gets_no_5xx() {
    let t = Topics::create("meters-http", 1);
    let (_, admin) = create_key(&t, None);
    let (_, acme) = create_key(&t, Some("acme"));
    let (mut serve, addr) = start_serve(&t, CONFIG);
    let ce = Some("application/cloudevents+json");
    let batch_ce = Some("application/cloudevents-batch+json");
    let time = "2026-11-22T10:00:00.123Z";
    let good = event_json("ok-1", "svc", "acme", time, r#"{"tokens":12,"model":"gpt-4"}"#);

    // A pulse where a CloudEvent belongs.
    let pulse = r#"{"pulse_id":"p1","tenant_id":"acme","product_sku":"storage.standard","use_unit":"GB","used_amount":"12.5"}"#;
    let (status, body) = post_events(&addr, Some(&admin), ce, pulse.into());
    assert_eq!(status, 400, "{body}");
    let errors = event_errors(&body);
    assert_eq!(errors.len(), 1, "{body}");
    assert_eq!((errors[0].0, errors[0].1.as_str()), (0, "missing_field"), "{body}");
    assert!(errors[0].2.contains("specversion"), "the detail names specversion: {body}");

    // One valid event, then one lacking each required attribute: all refused, each named.
    let mut batch = vec![good.clone()];
    for attr in ["id", "type", "source", "subject"] {
        let mut v: Value = serde_json::from_str(&good).unwrap();
        v.as_object_mut().unwrap().remove(attr);
        batch.push(v.to_string());
    }
    let (status, body) = post_events(&addr, Some(&admin), batch_ce, format!("[{}]", batch.join(",")).into());
    assert_eq!(status, 400, "{body}");
    let errors = event_errors(&body);
    assert_eq!(errors.iter().map(|e| (e.0, e.1.as_str())).collect::<Vec<_>>(),
        [(1, "missing_field"), (2, "missing_field"), (3, "missing_field"), (4, "missing_field")], "{body}");
    for ((_, _, detail), attr) in errors.iter().zip(["id", "type", "source", "subject"]) {
        assert!(detail.contains(&format!("{attr} is required")), "the detail names {attr}: {detail}");
    }
    assert!(json_of(&body)["detail"].as_str().is_some_and(|d| d.contains("nothing was accepted")), "{body}");

    // Bad times; values the meter cannot read (the batch as application/json).
    let mut batch = vec![good.clone()];
    for bad_time in ["yesterday", "2026-13-45T25:61:00Z", "2026-11-22 10:00:00"] {
        batch.push(event_json("t", "svc", "acme", bad_time, r#"{"tokens":1}"#));
    }
    for data in [r#"{"tokens":"lots"}"#, r#"{"tokens":{"n":1}}"#, r#"{"tokens":true}"#, r#"{"tokens":1e999999}"#, r#"{"tokens":"1e-999999"}"#, r#"{"model":"gpt-4"}"#] {
        batch.push(event_json("v", "svc", "acme", time, data));
    }
    let (status, body) = post_events(&addr, Some(&admin), Some("application/json"), format!("[{}]", batch.join(",")).into());
    assert_eq!(status, 400, "{body}");
    let errors = event_errors(&body);
    let reasons: Vec<(u64, &str)> = errors.iter().map(|e| (e.0, e.1.as_str())).collect();
    let mut want: Vec<(u64, &str)> = (1..=3).map(|i| (i, "bad_timestamp")).collect();
    want.extend((4..=9).map(|i| (i, "invalid_meter_value")));
    assert_eq!(reasons, want, "{body}");
    for (index, reason, detail) in &errors {
        if reason == "invalid_meter_value" {
            assert!(detail.starts_with("meter tokens_total:"), "index {index}: the detail names the meter: {detail}");
        }
    }

    // Too large: declared (answered before the body is sent), and sent chunked.
    let head = |length: &str| format!("POST /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/cloudevents-batch+json\r\nConnection: close\r\n{length}\r\n");
    let answer = raw_request(&addr, head(&format!("Content-Length: {TEN_MB}\r\n")), Vec::new());
    assert!(answer.starts_with("HTTP/1.1 413 ") && answer.contains("body_too_large"), "declared 10 MB: {answer}");
    let mut chunked = Vec::new();
    for _ in 0..TEN_MB / (1 << 16) {
        write!(chunked, "{:x}\r\n", 1 << 16).unwrap();
        chunked.extend(std::iter::repeat_n(b' ', 1 << 16));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_request(&addr, head("Transfer-Encoding: chunked\r\n"), chunked);
    assert!(answer.starts_with("HTTP/1.1 413 ") && answer.contains("body_too_large"), "10 MB chunked: {answer}");

    // Not JSON by its media type; no key; a wrong key; another tenant's subject.
    let (status, body) = post_events(&addr, Some(&admin), Some("text/plain"), good.clone().into());
    assert_eq!((status, json_of(&body)["error"].as_str()), (415, Some("unsupported_media_type")), "{body}");
    let (status, body) = post_events(&addr, None, ce, good.clone().into());
    assert_eq!((status, json_of(&body)["error"].as_str()), (401, Some("unauthorized")), "{body}");
    let (status, _) = post_events(&addr, Some("pk_nope.nope"), ce, good.clone().into());
    assert_eq!(status, 401);
    let globex = event_json("g-1", "svc", "globex", time, r#"{"tokens":1}"#);
    let (status, body) = post_events(&addr, Some(&acme), batch_ce, format!("[{good},{globex}]").into());
    assert_eq!((status, json_of(&body)["error"].as_str()), (403, Some("forbidden_tenant")), "{body}");

    assert_eq!(read_uncommitted(&t.source).len(), 0, "no refused request wrote anything");

    // Fuzz: every body gets an answer below 500; the service stays ready and alive.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed_3e7e);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let started = Instant::now();
    for i in 0..400 {
        let (content_type, body) = fuzz_body(&mut rng, &good);
        let shown = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        let (status, answer) = post_events(&addr, Some(&admin), content_type, body);
        assert!((200..500).contains(&status), "fuzz body {i} ({content_type:?}, {shown:?}): answered {status}: {answer}");
        if status != 204 {
            assert!(json_of(&answer)["error"].is_string(), "fuzz body {i}: an error answer is JSON with a code: {answer}");
        }
        *statuses.entry(status).or_default() += 1;
    }
    eprintln!("fuzz: 400 bodies in {:?}, answers by status {statuses:?}", started.elapsed());
    assert!(statuses.get(&400).is_some_and(|n| *n > 100), "most fuzzed bodies are refused as bad input: {statuses:?}");
    assert_eq!(common::http::get(&addr, "/readyz").map(|(s, _)| s), Some(200), "/readyz after the fuzz");
    assert!(serve.child.try_wait().unwrap().is_none(), "pulses serve is alive after the fuzz");
    let (status, body) = post_events(&addr, Some(&admin), ce, good.into());
    assert_eq!(status, 204, "a valid event is still accepted: {body}");
}

/// One event larger than a Kafka record may be (1 MB by default) but within the body
/// limit (5 MiB): the broker will never take it, so the answer is a client error, not a
/// 503 that asks the client to retry; and in a batch, the events before it are not
/// written either (all or nothing).
#[test]
fn an_event_larger_than_a_record_may_be_is_a_client_error_and_nothing_is_written() {
    let t = Topics::create("meters-big", 1);
    let (_, admin) = create_key(&t, None);
    let (_serve, addr) = start_serve(&t, CONFIG);
    let note = "x".repeat(2 * 1024 * 1024);
    let small = event_json("small", "svc", "acme", "2026-11-22T10:00:00Z", r#"{"tokens":7}"#);
    let big = event_json("big", "svc", "acme", "2026-11-22T10:00:00Z", &format!(r#"{{"tokens":1,"note":"{note}"}}"#));
    let (status, body) = post_events(&addr, Some(&admin), Some("application/cloudevents-batch+json"), format!("[{small},{big}]").into());
    let written = read_uncommitted(&t.source).len();
    assert!(status == 413 && body.contains("\"record_too_large\"") && written == 0,
        "413 record_too_large with nothing written; got {status} ({body}) and {written} record(s) written");
}

/// One fuzzed request: a content type and a body, from `valid` (a valid event) and the
/// seeded `rng`.
fn fuzz_body(rng: &mut impl Rng, valid: &str) -> (Option<&'static str>, Vec<u8>) {
    const TYPES: [Option<&str>; 8] = [
        Some("application/cloudevents+json"),
        Some("application/cloudevents-batch+json"),
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("APPLICATION/CLOUDEVENTS+JSON;;;"),
        Some(""),
        Some("application/x-www-form-urlencoded"),
        None,
    ];
    let content_type = TYPES[rng.gen_range(0..TYPES.len())];
    let body = match rng.gen_range(0..8) {
        0 => (0..rng.gen_range(0..2048)).map(|_| rng.gen()).collect(),
        1 => valid.as_bytes()[..rng.gen_range(0..valid.len())].to_vec(),
        2 => mutate(rng, valid.as_bytes()),
        3 => nested(rng),
        4 => huge_number(rng, valid),
        5 => unicode(rng, valid),
        6 => attribute_types(rng, valid),
        _ => {
            let items: Vec<Vec<u8>> = (0..rng.gen_range(0..20))
                .map(|_| match rng.gen_range(0..5) {
                    0 => valid.as_bytes().to_vec(),
                    1 => mutate(rng, valid.as_bytes()),
                    2 => huge_number(rng, valid),
                    3 => unicode(rng, valid),
                    _ => attribute_types(rng, valid),
                })
                .collect();
            [b"[".to_vec(), items.join(&b","[..]), b"]".to_vec()].concat()
        }
    };
    (content_type, body)
}

/// `bytes` with a few bytes replaced, inserted or removed, JSON's own characters favoured.
fn mutate(rng: &mut impl Rng, bytes: &[u8]) -> Vec<u8> {
    const SPECIAL: &[u8] = b"{}[]\",:\\.-+eE0123456789 \x00\xff";
    let mut out = bytes.to_vec();
    for _ in 0..rng.gen_range(1..8) {
        let at = rng.gen_range(0..=out.len());
        let byte = if rng.gen_bool(0.7) { SPECIAL[rng.gen_range(0..SPECIAL.len())] } else { rng.gen() };
        match rng.gen_range(0..3) {
            0 if at < out.len() => out[at] = byte,
            1 if at < out.len() => {
                out.remove(at);
            }
            _ => out.insert(at, byte),
        }
    }
    out
}

/// JSON nested thousands of levels deep: alone, or as the event's `data` (at most
/// 840 KB: a record the broker takes, see
/// [`an_event_larger_than_a_record_may_be_is_a_client_error_and_nothing_is_written`]).
fn nested(rng: &mut impl Rng) -> Vec<u8> {
    let depth = rng.gen_range(100..140_000);
    let (open, close) = if rng.gen_bool(0.5) { ("[", "]") } else { ("{\"a\":", "}") };
    let deep = format!("{}1{}", open.repeat(depth), close.repeat(depth));
    if rng.gen_bool(0.5) {
        deep.into_bytes()
    } else {
        event_json("deep", "svc", "acme", "2026-11-22T10:00:00Z", &format!("{{\"tokens\":1,\"x\":{deep}}}")).into_bytes()
    }
}

/// An event whose value (or another attribute) is a number no decimal holds.
fn huge_number(rng: &mut impl Rng, valid: &str) -> Vec<u8> {
    const NUMBERS: [&str; 14] = [
        "1e999999", "-1e999999", "1e-999999", "\"1e999999\"", "1E+29", "79228162514264337593543950336",
        "123456789012345678901234567890.123456789", "0.00000000000000000000000000001", "-0", "-12.5",
        "1e", "01", "\"NaN\"", "\"Infinity\"",
    ];
    let number = NUMBERS[rng.gen_range(0..NUMBERS.len())];
    match rng.gen_range(0..4) {
        0 => valid.replacen("\"tokens\":12", &format!("\"tokens\":{number}"), 1),
        1 => valid.replacen("\"ok-1\"", number, 1),
        2 => valid.replacen("\"2026-11-22T10:00:00.123Z\"", number, 1),
        _ => valid.replacen("\"gpt-4\"", number, 1),
    }
    .into_bytes()
}

/// An event with unicode (and broken escapes or UTF-8) in its attributes and data.
fn unicode(rng: &mut impl Rng, valid: &str) -> Vec<u8> {
    const TEXTS: [&str; 10] = ["ácme", "租户", "🦀🦀", "a\u{202e}b", "\\u0000", "\\ud800", "\\udfff\\ud800", "tab\\there", "\u{feff}acme", "x\\"];
    let text = TEXTS[rng.gen_range(0..TEXTS.len())];
    let field = ["\"acme\"", "\"ok-1\"", "\"svc\"", "\"prompt\"", "\"gpt-4\"", "\"1.0\""][rng.gen_range(0..6)];
    let mut out = valid.replacen(field, &format!("\"{text}\""), 1).into_bytes();
    if rng.gen_bool(0.2) {
        // Invalid UTF-8 inside a string.
        let at = out.iter().position(|b| *b == b'a').unwrap_or(0);
        out.insert(at, 0xc3);
        out.insert(at, 0xff);
    }
    out
}

/// An event whose attributes have the wrong JSON types, or are repeated.
fn attribute_types(rng: &mut impl Rng, valid: &str) -> Vec<u8> {
    const VALUES: [&str; 8] = ["null", "7", "[]", "{}", "true", "\"\"", "[\"a\"]", "{\"x\":1}"];
    let mut v: serde_json::Map<String, Value> = serde_json::from_str(valid).unwrap();
    let names = ["specversion", "id", "source", "type", "subject", "time", "data", "datacontenttype", "dataschema"];
    for _ in 0..rng.gen_range(1..4) {
        let name = names[rng.gen_range(0..names.len())];
        v.insert(name.to_owned(), serde_json::from_str(VALUES[rng.gen_range(0..VALUES.len())]).unwrap());
    }
    let mut text = Value::Object(v).to_string();
    if rng.gen_bool(0.2) {
        // A repeated key: serde's derive refuses it, a map keeps the last.
        text = text.replacen('{', "{\"subject\":\"acme\",", 1);
    }
    text.into_bytes()
}

// ---------------------------------------------------------------------------------
// 3 and 4. Events from kcat, metered live; re-metered by a replay
// ---------------------------------------------------------------------------------

/// One event the test writes, and what it should count.
#[derive(Clone, Debug)]
struct Ev {
    id: &'static str,
    source: &'static str,
    subject: &'static str,
    model: Option<&'static str>,
    /// `data.tokens` as written in the JSON (a number, or a string with its quotes).
    tokens: Option<&'static str>,
    at: i64,
}

impl Ev {
    fn line(&self) -> String {
        let mut data = Vec::new();
        if let Some(t) = self.tokens {
            data.push(format!("\"tokens\":{t}"));
        }
        if let Some(m) = self.model {
            data.push(format!("\"model\":\"{m}\""));
        }
        event_json(self.id, self.source, self.subject, &rfc3339(self.at), &format!("{{{}}}", data.join(",")))
    }

    /// The exact value, parsed here from the text as written.
    fn value(&self) -> Decimal {
        exact(self.tokens.expect("a metered event has tokens").trim_matches('"'))
    }
}

/// A decimal's exact value from its text, plain or with an exponent.
fn exact(text: &str) -> Decimal {
    let parsed = if text.contains(['e', 'E']) { Decimal::from_scientific(text) } else { Decimal::from_str(text) };
    parsed.unwrap_or_else(|e| panic!("{text} is a decimal: {e}"))
}

/// What was written for one test run: the events counted (each once), the re-sent one
/// and the one the meter cannot read.
struct History {
    t: Topics,
    run: Proc,
    /// `pulses serve` and its address, when asked for.
    serve: Option<(Proc, String)>,
    hour: i64,
    counted: Vec<Ev>,
    bad_line: String,
}

/// The events: two subjects, values as JSON numbers and strings, plain and with
/// exponents, at the first and last millisecond of an hour two hours ago; one id sent
/// by two sources (two events); one event re-sent (one event); one without a value.
fn events(hour: i64) -> (Vec<Ev>, Ev, Ev) {
    let ev = |id, source, subject, model, tokens, at| Ev { id, source, subject, model, tokens, at: hour + at };
    let counted = vec![
        ev("a-0", "chat", "acme", None, Some("\"0.0000000001\""), 0),
        ev("a-1", "chat", "acme", Some("gpt-4"), Some("12"), 5 * MINUTE + 1_000),
        ev("a-2", "chat", "acme", Some("gpt-4o"), Some("0.1"), 5 * MINUTE + 20_000),
        ev("a-3", "chat", "acme", Some("gpt-4"), Some("\"12.50\""), 6 * MINUTE + 3_000),
        // Same id, another source: another event.
        ev("a-1", "batch", "acme", Some("gpt-4"), Some("2.5E+1"), 7 * MINUTE),
        ev("g-1", "chat", "globex", Some("gpt-4"), Some("6.51e-7"), 5 * MINUTE + 2_000),
        ev("g-2", "chat", "globex", None, Some("\"6.51E-7\""), 6 * MINUTE + 40_000),
        ev("g-3", "chat", "globex", Some("gpt-4o"), Some("3"), HOUR - 1),
    ];
    let resent = counted[3].clone();
    let no_value = ev("a-4", "chat", "acme", Some("gpt-4"), None, 7 * MINUTE + 30_000);
    (counted, resent, no_value)
}

/// Produces `lines` to `partition` of `topic` with kcat, one JSON event a line.
fn kcat(topic: &str, partition: i32, lines: &[String]) {
    let mut child = Command::new("kcat")
        .args(["-P", "-b", &bootstrap(), "-t", topic, "-p", &partition.to_string()])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run kcat");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "kcat -P failed");
}

/// Starts `pulses run` (and `pulses serve` if `serve`), produces the events with kcat
/// (the re-sent one to another partition) and waits until both stages have committed
/// all of it.
fn metered_history(name: &str, serve: bool) -> History {
    let t = Topics::create(name, 3);
    let run = Proc::run(&t, CONFIG, &[]);
    run.wait_ready();
    let serve = serve.then(|| start_serve(&t, CONFIG));
    let hour = (now_ms() / HOUR - 2) * HOUR;
    let (counted, resent, no_value) = events(hour);
    let mut first: Vec<String> = counted.iter().map(Ev::line).collect();
    first.insert(4, no_value.line());
    kcat(&t.source, 0, &first);
    kcat(&t.source, 2, &[resent.line()]);
    wait_pipeline_done(&t);
    History { t, run, serve, hour, counted, bad_line: no_value.line() }
}

/// Exact sums of `tokens_total` by a key of each counted event.
fn sums<K: Ord>(events: &[Ev], key: impl Fn(&Ev) -> K) -> BTreeMap<K, Decimal> {
    let mut out = BTreeMap::new();
    for e in events {
        *out.entry(key(e)).or_insert(Decimal::ZERO) += e.value();
    }
    out
}

/// OpenMeter's `MeterQueryResult`, with each value kept as the JSON text it was sent as.
#[derive(Debug, Deserialize)]
struct QueryAnswer {
    data: Vec<QueryRow>,
}

#[derive(Debug, Deserialize)]
struct QueryRow {
    value: Box<RawValue>,
    #[serde(rename = "windowStart")]
    window_start: String,
    #[serde(rename = "windowEnd")]
    window_end: String,
    subject: Option<String>,
    #[serde(rename = "groupBy")]
    group_by: BTreeMap<String, Option<String>>,
}

impl QueryRow {
    /// The value: a JSON number (never a string), read exactly from its text.
    fn exact_value(&self) -> Decimal {
        let text = self.value.get();
        assert!(text.starts_with(|c: char| c == '-' || c.is_ascii_digit()), "a JSON number: {text}");
        exact(text)
    }

    fn start_ms(&self) -> i64 {
        chrono::DateTime::parse_from_rfc3339(&self.window_start).unwrap().timestamp_millis()
    }

    fn end_ms(&self) -> i64 {
        chrono::DateTime::parse_from_rfc3339(&self.window_end).unwrap().timestamp_millis()
    }
}

/// `GET /api/v1/meters/{slug}/query?{params}` with `key` as a bearer token.
fn query(addr: &str, key: &str, slug: &str, params: &str) -> Result<QueryAnswer, String> {
    let res = client()
        .get(format!("http://{addr}/api/v1/meters/{slug}/query?{params}"))
        .header("Authorization", format!("Bearer {key}"))
        .send()
        .map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let text = res.text().map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

/// Polls the query until its rows, keyed by `key`, hold exactly `want`; returns them.
fn query_until<K: Ord + std::fmt::Debug>(
    addr: &str,
    key: &str,
    params: &str,
    want: &BTreeMap<K, Decimal>,
    row_key: impl Fn(&QueryRow) -> K,
) -> Vec<QueryRow> {
    wait_until(&format!("tokens_total?{params} to answer {want:?}"), DEADLINE, || {
        let answer = query(addr, key, "tokens_total", params)?;
        let got: BTreeMap<K, Decimal> = answer.data.iter().map(|r| (row_key(r), r.exact_value())).collect();
        if got.len() == answer.data.len() && &got == want {
            Ok(answer.data)
        } else {
            Err(format!("got {got:?}"))
        }
    })
}

#[test]
fn events_from_kcat_are_metered_exactly_once_and_the_unreadable_one_is_in_the_dlq() {
    let h = metered_history("meters-kcat", true);
    let addr = h.serve.as_ref().map(|(_, addr)| addr.clone()).unwrap();
    let (_, admin) = create_key(&h.t, None);
    let (_, acme) = create_key(&h.t, Some("acme"));

    // Exactly the event without a value is in the DLQ, as it was sent, saying why.
    let dlq = read_all(&h.t.dlq);
    assert_eq!(dlq.len(), 1, "one record in the DLQ: {dlq:?}");
    let r = &dlq[0];
    assert_eq!(r.value, h.bad_line.as_bytes(), "the DLQ holds the original bytes");
    assert_eq!(r.headers.get("error.reason").map(String::as_str), Some("invalid_meter_value"), "{:?}", r.headers);
    let detail = r.headers.get("error.detail").cloned().unwrap_or_default();
    assert!(detail.starts_with("meter tokens_total:") && detail.contains("$.tokens"), "error.detail names the meter and its path: {detail}");
    assert_eq!(r.headers.get("source.topic"), Some(&h.t.source));

    // By subject over everything: one row per subject, its exact sum.
    let by_subject = sums(&h.counted, |e| e.subject.to_owned());
    assert_eq!(by_subject["acme"], exact("49.6000000001"), "the test's own arithmetic");
    let rows = query_until(&addr, &admin, "groupBy=subject", &by_subject, |r| r.subject.clone().unwrap_or_default());
    for r in &rows {
        assert_eq!((r.start_ms(), r.end_ms()), (h.hour, h.hour + HOUR), "the range of the stored windows: {r:?}");
        assert_eq!(r.group_by, BTreeMap::new(), "grouped by subject only: {r:?}");
    }

    // By minute and subject: every minute a union of stored minutes (the hour windows
    // cannot answer it).
    let by_minute = sums(&h.counted, |e| (e.subject.to_owned(), e.at - e.at.rem_euclid(MINUTE)));
    let rows = query_until(&addr, &admin, "groupBy=subject&windowSize=MINUTE", &by_minute, |r| (r.subject.clone().unwrap_or_default(), r.start_ms()));
    assert!(rows.iter().all(|r| r.end_ms() - r.start_ms() == MINUTE), "minute rows");

    // One subject, by model, in an explicit range; an event without a model is its own group.
    let acme_by_model = sums(&h.counted.iter().filter(|e| e.subject == "acme").cloned().collect::<Vec<_>>(), |e| e.model.map(str::to_owned));
    let range = format!("from={}&to={}", rfc3339(h.hour).replace('+', "%2B"), rfc3339(h.hour + HOUR).replace('+', "%2B"));
    let rows = query_until(&addr, &admin, &format!("subject=acme&groupBy=model&{range}"), &acme_by_model, |r| r.group_by["model"].clone());
    assert!(rows.iter().all(|r| r.subject.as_deref() == Some("acme")), "{rows:?}");

    // A tenant's key sees its own subject only, and may not ask for another.
    let own = query(&addr, &acme, "tokens_total", "").unwrap();
    assert_eq!(own.data.len(), 1, "{own:?}");
    assert_eq!(own.data[0].exact_value(), by_subject["acme"]);
    let other = query(&addr, &acme, "tokens_total", "subject=globex").unwrap_err();
    assert!(other.starts_with("403") && other.contains("forbidden_tenant"), "{other}");

    // Nothing went late: every event corrected or opened its windows.
    assert_eq!(read_all(&h.t.late).len(), 0, "no event in the late topic");
}

/// Usage of the current hour: its minute windows are final, its hour window is still
/// open. A query without a range (OpenMeter's default) must count the closed minutes, or
/// refuse; it must not answer as if nothing had been used.
#[test]
fn a_query_of_the_open_hour_counts_its_closed_minutes() {
    let t = Topics::create("meters-open-hour", 1);
    let _run = Proc::run(&t, CONFIG, &[]);
    let (_serve, addr) = start_serve(&t, CONFIG);
    let (_, admin) = create_key(&t, None);
    let now = now_ms();
    let hour = now - now.rem_euclid(HOUR);
    let evs = [
        Ev { id: "o-1", source: "chat", subject: "acme", model: None, tokens: Some("12"), at: now - 150_000 },
        Ev { id: "o-2", source: "chat", subject: "acme", model: None, tokens: Some("0.5"), at: now - 90_000 },
    ];
    kcat(&t.source, 0, &evs.iter().map(Ev::line).collect::<Vec<_>>());
    let by_minute = sums(&evs, |e| (e.subject.to_owned(), e.at - e.at.rem_euclid(MINUTE)));
    let range = format!("from={}&to={}", rfc3339(hour - HOUR), rfc3339(hour + HOUR));
    // The minute windows are there: asked by minute over a range, they answer.
    query_until(&addr, &admin, &format!("groupBy=subject&windowSize=MINUTE&{range}"), &by_minute, |r| (r.subject.clone().unwrap_or_default(), r.start_ms()));
    let answered = |params: &str| -> BTreeMap<String, Decimal> {
        let mut got = BTreeMap::new();
        for r in query(&addr, &admin, "tokens_total", params).unwrap().data {
            *got.entry(r.subject.clone().unwrap_or_default()).or_insert(Decimal::ZERO) += r.exact_value();
        }
        got
    };
    let want = sums(&evs, |e| e.subject.to_owned());
    let (minutes, all, ranged) = (answered("groupBy=subject&windowSize=MINUTE"), answered("groupBy=subject"), answered(&format!("groupBy=subject&{range}")));
    assert!(minutes == want && all == want && ranged == want,
        "want {want:?}; windowSize=MINUTE without a range: {minutes:?}; no range: {all:?}; {range}: {ranged:?}");
}

/// A final window aggregate: (tenant, window name, window start, total, count).
type Final = (String, String, i64, Decimal, u64);

/// Latest final revision of every aggregate of `slug` in `topic`, by aggregate_id.
fn finals_of(topic: &str, slug: &str) -> BTreeMap<String, Final> {
    let mut latest: BTreeMap<String, (u64, Final)> = BTreeMap::new();
    for r in read_all(topic) {
        let v = r.json();
        if v["final"] != true || v["meter"]["slug"] != slug {
            continue;
        }
        let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap()).unwrap().timestamp_millis();
        let value = (
            v["tenant_id"].as_str().unwrap().to_owned(),
            v["window"].as_str().unwrap().to_owned(),
            start,
            Decimal::from_str(v["total_amount"].as_str().unwrap()).unwrap(),
            v["pulse_count"].as_u64().unwrap(),
        );
        let rev = v["revision"].as_u64().unwrap();
        let id = v["aggregate_id"].as_str().unwrap().to_owned();
        if latest.get(&id).is_none_or(|(r, _)| *r < rev) {
            latest.insert(id, (rev, value));
        }
    }
    latest.into_iter().map(|(id, (_, v))| (id, v)).collect()
}

/// Per (tenant, window name), the sums of totals and counts of `finals`.
fn totals(finals: &BTreeMap<String, Final>) -> BTreeMap<(String, String), (Decimal, u64)> {
    let mut out: BTreeMap<(String, String), (Decimal, u64)> = BTreeMap::new();
    for (tenant, window, _, total, count) in finals.values() {
        let e = out.entry((tenant.clone(), window.clone())).or_default();
        e.0 += *total;
        e.1 += count;
    }
    out
}

#[test]
fn a_replay_with_a_new_meter_meters_the_history_in_the_log() {
    let h = metered_history("meters-replay", false);
    // Live: tokens_total by subject, each window final (the hour closes when the input
    // has been idle long enough).
    let mut want_live: BTreeMap<(String, String), (Decimal, u64)> = BTreeMap::new();
    for e in &h.counted {
        for window in ["minute", "hour"] {
            let w = want_live.entry((e.subject.to_owned(), window.to_owned())).or_default();
            w.0 += e.value();
            w.1 += 1;
        }
    }
    let live = wait_until("every live tokens_total window final", DEADLINE, || {
        let finals = finals_of(&h.t.aggregated, "tokens_total");
        if totals(&finals) == want_live { Ok(finals) } else { Err(format!("{:?}", totals(&finals))) }
    });

    // Replay everything from the hour on, with a meter the live pipeline never had.
    let cfg_path = h.run.state_dir.path().join("replay.toml");
    std::fs::write(&cfg_path, format!("{CONFIG}{PROMPTS_METER}")).unwrap();
    let out = format!("{}.replay", h.t.app);
    run_replay(&h.t, &cfg_path, &["--from", &rfc3339(h.hour)], &out);

    let records = read_all(&out);
    assert!(records.iter().all(|r| r.json()["final"] == true), "a replay writes final aggregates only");
    assert!(records.iter().all(|r| ["prompts", "tokens_total"].contains(&r.json()["meter"]["slug"].as_str().unwrap_or(""))),
        "nothing but the two meters' windows in the replay output");
    let prompts = finals_of(&out, "prompts");
    let distinct: BTreeSet<(&str, &str)> = h.counted.iter().map(|e| (e.source, e.id)).collect();
    assert_eq!(distinct.len(), h.counted.len(), "the counted events are distinct by source and id");
    let mut want_prompts: BTreeMap<(String, String), (Decimal, u64)> = BTreeMap::new();
    for e in &h.counted {
        for window in ["minute", "hour"] {
            let w = want_prompts.entry((e.subject.to_owned(), window.to_owned())).or_default();
            w.0 += Decimal::ONE;
            w.1 += 1;
        }
    }
    assert_eq!((want_prompts[&("acme".into(), "hour".into())].1, want_prompts[&("globex".into(), "hour".into())].1), (5, 3));
    assert_eq!(totals(&prompts), want_prompts, "prompts: one per distinct valid event, by subject");
    for r in &records {
        let v = r.json();
        if v["meter"]["slug"] == "prompts" {
            assert_eq!(v["meter"]["aggregation"], "count", "{v}");
        }
    }
    // The live meter's windows again: same ids, same totals and counts.
    assert_eq!(finals_of(&out, "tokens_total"), live, "tokens_total: the replay reproduces the live windows");
}
