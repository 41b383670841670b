//! `POST /v1/pulses` (SPEC §8): where a pulse enters over HTTP. A request is all or
//! nothing: every pulse is checked with stage 1's own validation before any is
//! written, and the answer is 202 only once the broker acknowledged every record
//! (idempotent producer, acks=all). A broker that does not answer in time gets the
//! client a 503: it retries, and `pulse_id` de-duplicates downstream, so a pulse is
//! never acknowledged and then missing, nor counted twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use serde_json::value::RawValue;

use super::error::{ApiError, PulseError};
use super::keys::Caller;
use super::metrics::ReasonLabels;
use super::App;
use crate::pulse::json::decode_pulse;
use crate::pulse::validate::{normalise, RecordContext};

/// Largest request body (SPEC §8).
pub const MAX_BODY_BYTES: usize = crate::config::ServeSettings::MAX_BODY_BYTES;
/// Most pulses in one request (SPEC §8).
pub const MAX_PULSES: usize = 10_000;
/// Longest `Idempotency-Key`: ids derived from it (`<key>:<index>`) stay under the
/// pulse_id limit.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

/// A pulse (or CloudEvent) checked and ready to write: its id (the record key) and the
/// record value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub pulse_id: String,
    pub tenant_id: String,
    pub value: Vec<u8>,
}

/// The 202 answer.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub accepted: usize,
    pub pulse_ids: Vec<String>,
}

/// Checks a request body (one pulse or an array) for `caller`: every pulse valid as
/// stage 1 validates it, every tenant one the caller may act for. Pulses without
/// `pulse_id` get `<idempotency_key>:<index>`, or a random UUID. `now_ms` is the
/// record time stage 1 falls back on for pulses without a timestamp.
pub fn prepare(body: &[u8], caller: &Caller, idempotency_key: Option<&str>, now_ms: i64, source_topic: &str) -> Result<Vec<Prepared>, ApiError> {
    let items = pulses_of(body)?;
    if let Some(key) = idempotency_key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::bad_request(
                "invalid_idempotency_key",
                format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
            ));
        }
    }
    let ctx = RecordContext { topic: source_topic, partition: 0, offset: 0, record_time_ms: Some(now_ms) };
    let mut prepared = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let bytes = item.get().as_bytes();
        let mut raw = match decode_pulse(bytes) {
            Ok(raw) => raw,
            Err(r) => {
                errors.push(PulseError { index, reason: r.reason.as_str(), detail: r.detail });
                continue;
            }
        };
        if let Some(tenant) = raw.tenant_id.as_deref() {
            if !caller.may_act_for(tenant) {
                return Err(ApiError::forbidden_tenant(tenant));
            }
        }
        let assigned = match raw.pulse_id {
            Some(_) => None,
            None => Some(match idempotency_key {
                Some(key) => format!("{key}:{index}"),
                None => uuid::Uuid::new_v4().to_string(),
            }),
        };
        if let Some(id) = &assigned {
            raw.pulse_id = Some(std::borrow::Cow::Owned(id.clone()));
        }
        let pulse = match normalise(raw, &ctx) {
            Ok(p) => p,
            Err(r) => {
                errors.push(PulseError { index, reason: r.reason.as_str(), detail: r.detail });
                continue;
            }
        };
        let value = match assigned {
            None => bytes.to_vec(),
            Some(id) => with_pulse_id(item, &id)?,
        };
        prepared.push(Prepared { pulse_id: pulse.pulse_id, tenant_id: pulse.tenant_id, value });
    }
    if errors.is_empty() {
        Ok(prepared)
    } else {
        Err(ApiError::invalid_pulses(errors))
    }
}

/// The pulses of a body: a JSON array of them, or one.
fn pulses_of(body: &[u8]) -> Result<Vec<&RawValue>, ApiError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(first) => items_of(body, *first == b'[', Items { noun: "pulse", array: "array", too_many: "too_many_pulses" }),
        None => Err(ApiError::bad_request("invalid_json", "the body is empty; send a pulse or an array of pulses")),
    }
}

/// What a request body holds, for its error answers.
pub(super) struct Items {
    pub noun: &'static str,
    /// What a client calls the array (`array`, `batch`).
    pub array: &'static str,
    /// The error code of a body with more than [`MAX_PULSES`] items.
    pub too_many: &'static str,
}

/// The items of a body that is one JSON value, or an array of at least one and at most
/// [`MAX_PULSES`] (pulses and CloudEvents alike), each kept as its JSON text.
pub(super) fn items_of(body: &[u8], array: bool, what: Items) -> Result<Vec<&RawValue>, ApiError> {
    let invalid = |e: serde_json::Error| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}"));
    let items: Vec<&RawValue> =
        if array { serde_json::from_slice(body).map_err(invalid)? } else { vec![serde_json::from_slice(body).map_err(invalid)?] };
    if items.is_empty() {
        return Err(ApiError::bad_request("invalid_json", format!("the {} is empty; send at least one {}", what.array, what.noun)));
    }
    if items.len() > MAX_PULSES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            what.too_many,
            format!("{} {}s in one request; at most {MAX_PULSES}", items.len(), what.noun),
        ));
    }
    Ok(items)
}

/// The pulse `item` (a valid JSON object) with `pulse_id` set; other fields keep
/// their exact text (amounts are not re-encoded through floats).
fn with_pulse_id(item: &RawValue, id: &str) -> Result<Vec<u8>, ApiError> {
    let internal = |e: serde_json::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    let mut fields: BTreeMap<String, &RawValue> = serde_json::from_str(item.get()).map_err(internal)?;
    let id = serde_json::value::to_raw_value(id).map_err(internal)?;
    fields.insert("pulse_id".into(), &id);
    serde_json::to_vec(&fields).map_err(internal)
}

/// `POST /v1/pulses`.
pub async fn post_pulses(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let caller = app.authenticate(&headers)?;
    let (body, _bytes) = read_body(&app, &headers, body).await?;
    let idempotency_key = headers.get("idempotency-key").map(|v| v.to_str().unwrap_or(""));
    let now_ms = crate::pulse::time::now_ms();
    let prepared = prepare(&body, &caller, idempotency_key, now_ms, &app.cfg.topics.source).inspect_err(|e| {
        for err in &e.errors {
            app.metrics.pulses_rejected.get_or_create(&ReasonLabels { reason: err.reason.to_owned() }).inc();
        }
    })?;
    app.write(&prepared, now_ms).await?;
    app.metrics.pulses_accepted.inc_by(prepared.len() as u64);
    let pulse_ids = prepared.into_iter().map(|p| p.pulse_id).collect::<Vec<_>>();
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: pulse_ids.len(), pulse_ids })))
}

/// Reads a request body of at most [`MAX_BODY_BYTES`] (else 413). Bounded memory: the
/// request holds its declared size (or the largest allowed) of the in-flight byte
/// budget until it is answered (the permit returned).
pub(super) async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> Result<(axum::body::Bytes, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(MAX_BODY_BYTES);
    if declared > MAX_BODY_BYTES {
        return Err(too_large());
    }
    let permit = app.limits.reserve_bytes(declared)?;
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|_| too_large())?;
    Ok((body, permit))
}

/// Room for the key, headers and record-batch framing within `message.max.bytes`.
const RECORD_OVERHEAD: usize = 1024;

/// The largest record the producer sends: librdkafka's `message.max.bytes` (its
/// default, 1,000,000, unless `[kafka]` sets it).
fn record_limit(cfg: &crate::config::Config) -> usize {
    cfg.kafka.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}

fn too_large() -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("the body is larger than {MAX_BODY_BYTES} bytes"))
}

impl App {
    /// Writes `pulses` (or CloudEvents) to the source topic and waits until the broker
    /// acknowledged every one, for at most the ack timeout.
    pub(super) async fn write(&self, pulses: &[Prepared], now_ms: i64) -> Result<(), ApiError> {
        let retry_after = self.settings.ack_timeout.as_secs().max(1);
        // A record the producer would refuse as too large is the client's error, not a
        // reason to retry; checked before anything is written, so none of the request is.
        let limit = record_limit(&self.cfg);
        if let Some((index, p)) = pulses.iter().enumerate().find(|(_, p)| p.value.len() + p.pulse_id.len() + RECORD_OVERHEAD > limit) {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "record_too_large", format!(
                "item {index} is {} bytes; one record may be at most {} (the producer's message.max.bytes, {limit}); nothing was accepted",
                p.value.len(), limit - RECORD_OVERHEAD
            )));
        }
        let mut deliveries = Vec::with_capacity(pulses.len());
        for p in pulses {
            let record = FutureRecord::to(&self.cfg.topics.source).key(&p.pulse_id).payload(&p.value).timestamp(now_ms);
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => {
                    self.metrics.producer_errors.inc();
                    return Err(ApiError::unavailable(format!("the producer refused a pulse: {e}; retry"), retry_after));
                }
            }
        }
        let acked = tokio::time::timeout(self.settings.ack_timeout, futures::future::join_all(deliveries)).await;
        let failed = match acked {
            Err(_) => Some(format!("the broker did not acknowledge within {:?}", self.settings.ack_timeout)),
            Ok(results) => results.into_iter().find_map(|r| match r {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(format!("the broker refused a pulse: {e}")),
                Err(_) => Some("the producer dropped a pulse".to_owned()),
            }),
        };
        match failed {
            None => Ok(()),
            Some(why) => {
                self.metrics.producer_errors.inc();
                tracing::warn!(pulses = pulses.len(), "ingest answered 503: {why}");
                Err(ApiError::unavailable(format!("{why}; nothing is acknowledged, retry with the same pulse_ids"), retry_after))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(t: &str) -> Caller {
        Caller::Tenant { key_id: "k".into(), tenant_id: t.into() }
    }

    const ACME: &str = r#""tenant_id":"acme","product_sku":"vm.small","use_unit":"hour","timestamp":"2026-12-03T10:00:00Z""#;

    fn body(items: &[String]) -> Vec<u8> {
        format!("[{}]", items.join(",")).into_bytes()
    }

    #[test]
    fn pulses_keep_their_exact_text_and_get_ids_from_the_idempotency_key() {
        let with_id = format!(r#"{{"pulse_id":"p-1",{ACME},"used_amount":12.50}}"#);
        let without = format!(r#"{{{ACME},"used_amount":"0.000000000000000001","pulse_id":null}}"#);
        let got = prepare(&body(&[with_id.clone(), without]), &tenant("acme"), Some("batch-7"), 0, "source.pulses").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].pulse_id.as_str(), got[0].value.as_slice()), ("p-1", with_id.as_bytes()));
        assert_eq!(got[1].pulse_id, "batch-7:1");
        let v: serde_json::Value = serde_json::from_slice(&got[1].value).unwrap();
        assert_eq!(v["pulse_id"], "batch-7:1");
        // The amount's text is kept digit for digit.
        assert!(std::str::from_utf8(&got[1].value).unwrap().contains(r#""used_amount":"0.000000000000000001""#));
    }

    #[test]
    fn without_a_key_each_pulse_gets_a_fresh_uuid() {
        let one = format!(r#"{{{ACME},"used_amount":"1"}}"#);
        let a = prepare(one.as_bytes(), &tenant("acme"), None, 0, "s").unwrap();
        let b = prepare(one.as_bytes(), &tenant("acme"), None, 0, "s").unwrap();
        assert_eq!(a[0].pulse_id.len(), 36);
        assert_ne!(a[0].pulse_id, b[0].pulse_id);
    }

    #[test]
    fn one_invalid_pulse_rejects_the_request_with_every_reason() {
        let good = format!(r#"{{{ACME},"used_amount":"1"}}"#);
        let negative = format!(r#"{{{ACME},"used_amount":"-1"}}"#);
        let no_sku = r#"{"tenant_id":"acme","use_unit":"h","used_amount":"1"}"#.to_owned();
        let err = prepare(&body(&[good, negative, no_sku, "7".into()]), &tenant("acme"), None, 0, "s").unwrap_err();
        assert_eq!((err.status, err.code), (StatusCode::BAD_REQUEST, "invalid_pulse"));
        let reasons: Vec<(usize, &str)> = err.errors.iter().map(|e| (e.index, e.reason)).collect();
        assert_eq!(reasons, [(1, "negative_amount"), (2, "missing_field"), (3, "invalid_json")]);
    }

    #[test]
    fn a_tenant_key_cannot_write_for_another_tenant_but_an_admin_key_can() {
        let other = r#"{"tenant_id":"globex","product_sku":"s","use_unit":"u","used_amount":"1"}"#;
        let err = prepare(other.as_bytes(), &tenant("acme"), None, 0, "s").unwrap_err();
        assert_eq!((err.status, err.code), (StatusCode::FORBIDDEN, "forbidden_tenant"));
        assert!(prepare(other.as_bytes(), &Caller::Admin { key_id: "a".into() }, None, 0, "s").is_ok());
    }

    #[test]
    fn bodies_that_are_no_pulses_are_refused() {
        let caller = tenant("acme");
        for (bad, code) in [(&b""[..], "invalid_json"), (b"[]", "invalid_json"), (b"{", "invalid_json"), (b"[1,", "invalid_json")] {
            let err = prepare(bad, &caller, None, 0, "s").unwrap_err();
            assert_eq!((err.status, err.code), (StatusCode::BAD_REQUEST, code), "{:?}", String::from_utf8_lossy(bad));
        }
        let many = body(&vec![format!(r#"{{{ACME},"used_amount":"1"}}"#); MAX_PULSES + 1]);
        assert_eq!(prepare(&many, &caller, None, 0, "s").unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
        let one = format!(r#"{{{ACME},"used_amount":"1"}}"#);
        let err = prepare(one.as_bytes(), &caller, Some("has space"), 0, "s").unwrap_err();
        assert_eq!(err.code, "invalid_idempotency_key");
    }
}
