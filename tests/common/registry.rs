//! An in-process Confluent Schema Registry test double: a tiny HTTP/1.1 server on
//! 127.0.0.1 implementing the part of the REST API `schema_registry_converter` calls
//! (register, schema by id, latest version of a subject), with an outage switch (503)
//! and request counters. No Schema Registry server can be installed on these machines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::http::{serve, serve_https, Request, Response};

#[derive(Default)]
struct State {
    /// id - 1 → schema text.
    schemas: Vec<String>,
    /// subject → ids of its versions, oldest first.
    subjects: HashMap<String, Vec<u32>>,
    outage_until: Option<Instant>,
    /// `Basic ...`: every request without it is answered 401.
    required_authorization: Option<String>,
}

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub register: AtomicU64,
    pub by_id: AtomicU64,
    pub latest: AtomicU64,
    /// Requests answered 503 because of an outage.
    pub unavailable: AtomicU64,
    /// Requests answered 401: no or wrong basic-auth credentials.
    pub unauthorized: AtomicU64,
    pub not_found: AtomicU64,
}

/// A running registry double; serves until the test process ends.
#[derive(Clone)]
pub struct RegistryDouble {
    pub url: String,
    state: Arc<Mutex<State>>,
    pub counters: Arc<Counters>,
}

impl RegistryDouble {
    pub fn start() -> Self {
        Self::start_with(serve)
    }

    /// A registry double over HTTPS (certificate and key in `tls`, e.g. the secure
    /// broker's `broker.pem`, valid for 127.0.0.1) that answers 401 to any request
    /// without HTTP basic auth `user`:`password`, as Confluent Cloud's does.
    pub fn start_https(tls: &std::path::Path, user: &str, password: &str) -> Self {
        use base64::Engine;
        let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        let (cert, key) = (tls.join("broker.pem"), tls.join("broker.key"));
        let d = Self::start_with(move |respond| serve_https(&cert, &key, respond));
        d.state.lock().unwrap().required_authorization = Some(expected);
        d
    }

    /// Starts the double's handler on the server `listen` starts; `listen` returns its URL.
    fn start_with(listen: impl FnOnce(Box<dyn Fn(Request) -> Response + Send + Sync>) -> String) -> Self {
        let (state, counters): (Arc<Mutex<State>>, Arc<Counters>) = (Arc::default(), Arc::default());
        let d = Self { url: String::new(), state: Arc::clone(&state), counters: Arc::clone(&counters) };
        let url = listen(Box::new(move |req: Request| {
            let (status, body) = d.handle(&req);
            Response { status, content_type: "application/vnd.schemaregistry.v1+json", body }
        }));
        Self { url, state, counters }
    }

    /// Registers `schema` under `subject` (as a producer would) and returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        let mut s = self.state.lock().unwrap();
        register(&mut s, subject, schema)
    }

    /// The schema text of `id`.
    pub fn schema(&self, id: u32) -> Option<String> {
        self.state.lock().unwrap().schemas.get(id.checked_sub(1)? as usize).cloned()
    }

    /// The latest (id, schema) of `subject`.
    pub fn latest(&self, subject: &str) -> Option<(u32, String)> {
        let s = self.state.lock().unwrap();
        let id = *s.subjects.get(subject)?.last()?;
        Some((id, s.schemas[id as usize - 1].clone()))
    }

    /// Answers every request with 503 for `d` from now.
    pub fn outage_for(&self, d: Duration) {
        self.state.lock().unwrap().outage_until = Some(Instant::now() + d);
    }

    /// Whether a started outage is over (or none was started).
    pub fn outage_until_passed(&self) -> bool {
        self.state.lock().unwrap().outage_until.is_none_or(|t| Instant::now() >= t)
    }

    fn handle(&self, req: &Request) -> (u16, String) {
        let (method, path, body) = (req.method.as_str(), req.path.as_str(), req.body.as_slice());
        let c = &self.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state.lock().unwrap();
        if s.required_authorization.as_ref().is_some_and(|a| req.authorization.as_ref() != Some(a)) {
            c.unauthorized.fetch_add(1, Ordering::Relaxed);
            return (401, r#"{"error_code":40101,"message":"Unauthorized"}"#.into());
        }
        if s.outage_until.is_some_and(|t| Instant::now() < t) {
            c.unavailable.fetch_add(1, Ordering::Relaxed);
            return (503, r#"{"error_code":50300,"message":"registry double: outage"}"#.into());
        }
        let path = path.split('?').next().unwrap_or("");
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let not_found = |what: &str| {
            c.not_found.fetch_add(1, Ordering::Relaxed);
            (404, serde_json::json!({"error_code": 40403, "message": format!("{what} not found")}).to_string())
        };
        match (method, segs.as_slice()) {
            ("POST", ["subjects", subject, "versions"]) => {
                c.register.fetch_add(1, Ordering::Relaxed);
                let v: serde_json::Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(_) => return (422, r#"{"error_code":42201,"message":"invalid body"}"#.into()),
                };
                let schema = v["schema"].as_str().unwrap_or_default().to_owned();
                let id = register(&mut s, &decode(subject), &schema);
                (200, serde_json::json!({ "id": id }).to_string())
            }
            ("GET", ["schemas", "ids", id]) => {
                c.by_id.fetch_add(1, Ordering::Relaxed);
                match id.parse::<usize>().ok().and_then(|i| s.schemas.get(i.checked_sub(1)?)) {
                    Some(schema) => (200, serde_json::json!({ "schema": schema }).to_string()),
                    None => not_found("schema"),
                }
            }
            ("GET", ["subjects", subject, "versions", "latest"]) => {
                c.latest.fetch_add(1, Ordering::Relaxed);
                let subject = decode(subject);
                match s.subjects.get(&subject).and_then(|v| v.last().map(|id| (*id, v.len()))) {
                    Some((id, version)) => (
                        200,
                        serde_json::json!({"subject": subject, "id": id, "version": version,
                            "schema": s.schemas[id as usize - 1]})
                        .to_string(),
                    ),
                    None => not_found("subject"),
                }
            }
            _ => not_found("endpoint"),
        }
    }
}

/// The id of `schema` (the same text gets the same id, as in Confluent's registry),
/// added as a new version of `subject` unless it already is its latest.
fn register(s: &mut State, subject: &str, schema: &str) -> u32 {
    let id = match s.schemas.iter().position(|x| x == schema) {
        Some(i) => i as u32 + 1,
        None => {
            s.schemas.push(schema.to_owned());
            s.schemas.len() as u32
        }
    };
    let versions = s.subjects.entry(subject.to_owned()).or_default();
    if versions.last() != Some(&id) {
        versions.push(id);
    }
    id
}

fn decode(segment: &str) -> String {
    segment.replace("%2F", "/")
}

/// Avro helpers of the tests, written against apache-avro directly (not pulses' code).
pub mod avro {
    use apache_avro::schema::Schema;
    use apache_avro::types::Value;

    use crate::common::agg::P;

    pub fn schema_text(file: &str) -> String {
        std::fs::read_to_string(crate::common::repo_root().join("schemas").join(file)).expect("read schema file")
    }

    pub fn parse(text: &str) -> Schema {
        Schema::parse_str(text).expect("valid schema")
    }

    /// Magic byte, schema id, datum.
    pub fn framed(id: u32, datum: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(datum);
        v
    }

    pub fn write(schema: &Schema, value: Value) -> Vec<u8> {
        apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .expect("value matches schema")
    }

    /// A Confluent wire-format value of `p` under schemas/pulse.avsc (registered as `id`).
    pub fn pulse(schema: &Schema, id: u32, p: &P) -> Vec<u8> {
        let s = |x: &str| Value::String(x.to_owned());
        let record = Value::Record(vec![
            ("pulse_id".into(), Value::Union(1, Box::new(s(&p.id)))),
            ("tenant_id".into(), s(&p.tenant)),
            ("product_sku".into(), s(&p.sku)),
            ("use_unit".into(), s(&p.unit)),
            ("used_amount".into(), s(&p.amount.to_string())),
            ("timestamp".into(), Value::Union(1, Box::new(Value::TimestampMillis(p.at)))),
            ("attributes".into(), Value::Union(0, Box::new(Value::Null))),
        ]);
        framed(id, &write(schema, record))
    }

    /// Decodes a Confluent wire-format value with the schema `lookup` gives for its id.
    pub fn decode(value: &[u8], lookup: impl Fn(u32) -> Option<String>) -> (u32, Value) {
        assert_eq!(value[0], 0, "magic byte");
        let id = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
        let schema = parse(&lookup(id).unwrap_or_else(|| panic!("schema id {id} unknown to the registry")));
        let mut body = &value[5..];
        let v = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut body)
            .expect("decodes with its registered schema");
        assert!(body.is_empty(), "no trailing bytes");
        (id, v)
    }

    /// The fields of a decoded record by name, unions unwrapped.
    pub fn fields(v: Value) -> std::collections::HashMap<String, Value> {
        match v {
            Value::Record(f) => f
                .into_iter()
                .map(|(k, v)| match v {
                    Value::Union(_, inner) => (k, *inner),
                    v => (k, v),
                })
                .collect(),
            other => panic!("not a record: {other:?}"),
        }
    }
}
