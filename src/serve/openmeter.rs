//! OpenMeter's API over pulses' meters (SPEC §10), so OpenMeter's clients and SDKs work
//! with their URL changed:
//! - `POST /api/v1/events`: CloudEvents, one (`application/cloudevents+json`) or a
//!   batch (`application/cloudevents-batch+json`), or either as `application/json`;
//!   all or nothing, checked as stage 1 meters them, 204 once the broker acknowledged;
//! - `GET /api/v1/meters[/{idOrSlug}]`: the configured meters in OpenMeter's shape;
//! - `GET /api/v1/meters/{idOrSlug}/query`: usage folded from the stored windows
//!   ([`crate::meter::query`]), values as exact decimal JSON numbers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde_json::value::RawValue;
use serde_json::{json, Value};


use super::error::{ApiError, PulseError};
use super::ingest::{items_of, read_body, Items, Prepared};
use super::App;
use crate::meter::apply::read;
use crate::meter::event::CloudEvent;
use crate::meter::query::{self, Query, StoredSize, StoredWindow, WindowSize};
use crate::meter::{Meter, Meters};
use crate::pulse::time;
use crate::window::WindowAggregate;

/// Checks a request's events for `caller`: every one a CloudEvent every meter of its
/// type can read, every subject one the caller may act for. The events are written as
/// sent, keyed by their id.
pub fn prepare_events(body: &[u8], content_type: &str, caller: &super::keys::Caller, meters: &Meters) -> Result<Vec<Prepared>, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let trimmed = body.iter().find(|b| !b.is_ascii_whitespace());
    let batch = match media.as_str() {
        "application/cloudevents+json" => false,
        "application/cloudevents-batch+json" => true,
        "application/json" | "" => trimmed == Some(&b'['),
        other => {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", format!(
                "Content-Type {other:?}: send application/cloudevents+json, application/cloudevents-batch+json or application/json"
            )))
        }
    };
    let items = items_of(body, batch, Items { noun: "event", array: "batch", too_many: "too_many_events" })?;
    let mut prepared = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let bytes = item.get().as_bytes();
        let event = match CloudEvent::decode(bytes) {
            Ok(e) => e,
            Err(r) => {
                errors.push(PulseError { index, reason: r.reason.as_str(), detail: r.detail });
                continue;
            }
        };
        if !caller.may_act_for(&event.subject) {
            return Err(ApiError::forbidden_tenant(&event.subject));
        }
        if let Some(r) = meters.of_type(&event.kind).find_map(|m| read(m, &event).err()) {
            errors.push(PulseError { index, reason: r.reason.as_str(), detail: r.detail });
            continue;
        }
        prepared.push(Prepared { pulse_id: event.id.to_string(), tenant_id: event.subject.clone(), value: bytes.to_vec() });
    }
    if errors.is_empty() {
        Ok(prepared)
    } else {
        Err(ApiError::invalid_events(errors))
    }
}

/// `POST /api/v1/events`.
pub async fn post_events(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Result<StatusCode, ApiError> {
    let caller = app.authenticate(&headers)?;
    let (body, _bytes) = read_body(&app, &headers, body).await?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let prepared = prepare_events(&body, content_type, &caller, &app.cfg.meters)?;
    app.write(&prepared, time::now_ms()).await?;
    app.metrics.events_accepted.inc_by(prepared.len() as u64);
    Ok(StatusCode::NO_CONTENT)
}

/// A meter in OpenMeter's shape. A meter's id is its slug: meters are configuration.
fn meter_json(m: &Meter) -> Value {
    json!({
        "id": m.slug,
        "slug": m.slug,
        "name": m.name.clone().unwrap_or_else(|| m.slug.clone()),
        "description": m.description,
        "aggregation": m.aggregation.openmeter_name(),
        "eventType": m.event_type,
        "valueProperty": m.value_property.as_ref().map(|p| p.to_string()),
        "groupBy": m.group_by.iter().map(|(k, p)| (k.clone(), Value::String(p.to_string()))).collect::<serde_json::Map<_, _>>(),
        "createdAt": "1970-01-01T00:00:00Z",
        "updatedAt": "1970-01-01T00:00:00Z",
    })
}

/// `GET /api/v1/meters`.
pub async fn list_meters(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    app.authenticate(&headers)?;
    Ok(Json(Value::Array(app.cfg.meters.all().iter().map(meter_json).collect())))
}

fn meter_of<'a>(app: &'a App, slug: &str) -> Result<&'a Meter, ApiError> {
    app.cfg.meters.get(slug).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "meter_not_found", format!("no meter {slug:?} is configured ([[meters]] in the configuration)"))
    })
}

/// `GET /api/v1/meters/{idOrSlug}`.
pub async fn get_meter(State(app): State<Arc<App>>, headers: HeaderMap, Path(slug): Path<String>) -> Result<Json<Value>, ApiError> {
    app.authenticate(&headers)?;
    Ok(Json(meter_json(meter_of(&app, &slug)?)))
}

/// The query's parameters, as OpenMeter names them. `filterGroupBy` comes as
/// `filterGroupBy[key]=value` (OpenAPI's deepObject) or as one object, in JSON or as
/// OpenMeter's Python SDK 1.0.0b236 sends it (`{'key': 'value'}`, Python's repr).
pub fn parse_query(raw: &str, meter: &Meter) -> Result<Query, ApiError> {
    let bad = |detail: String| ApiError::bad_request("invalid_parameter", detail);
    let mut q = Query::default();
    let time_of = |k: &str, v: &str| time::parse_rfc3339_ms(v).ok_or_else(|| bad(format!("{k} {v:?} is not an RFC 3339 time")));
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        match k.as_ref() {
            "from" => q.from = Some(time_of("from", &v)?),
            "to" => q.to = Some(time_of("to", &v)?),
            "windowSize" => q.window_size = Some(v.parse::<WindowSize>().map_err(bad)?),
            "windowTimeZone" => q.time_zone = query::time_zone(&v).map_err(bad)?,
            "subject" => q.subjects.push(v.into_owned()),
            "groupBy" => q.group_by.push(v.into_owned()),
            "filterGroupBy" => q.filter_group_by.extend(filter_object(&v).ok_or_else(|| bad(format!("filterGroupBy {v:?} is not an object of strings")))?),
            key if key.starts_with("filterGroupBy[") && key.ends_with(']') => {
                q.filter_group_by.insert(key["filterGroupBy[".len()..key.len() - 1].to_owned(), v.into_owned());
            }
            // Accepted and without effect here: OpenMeter's client id and customer filters.
            "clientId" | "filterCustomerId" => {}
            other => return Err(bad(format!("unknown query parameter {other:?}"))),
        }
    }
    for g in &q.group_by {
        if g != "subject" && !meter.group_by.contains_key(g) {
            return Err(bad(format!("groupBy {g:?} is not a group-by of meter {} ({})", meter.slug, known(meter))));
        }
    }
    for g in q.filter_group_by.keys() {
        if !meter.group_by.contains_key(g) {
            return Err(bad(format!("filterGroupBy {g:?} is not a group-by of meter {} ({})", meter.slug, known(meter))));
        }
    }
    Ok(q)
}

fn known(meter: &Meter) -> String {
    let names: Vec<&str> = meter.group_by.keys().map(String::as_str).collect();
    if names.is_empty() { "it has none".into() } else { format!("it has {}", names.join(", ")) }
}

/// `{"k":"v"}` or `{'k': 'v'}`: an object of strings.
fn filter_object(text: &str) -> Option<BTreeMap<String, String>> {
    if let Ok(m) = serde_json::from_str::<BTreeMap<String, String>>(text) {
        return Some(m);
    }
    // Python's repr of a dict of str: single-quoted strings (double-quoted when the
    // text holds a single quote), backslash escapes.
    let mut out = BTreeMap::new();
    let mut chars = text.trim().strip_prefix('{')?.strip_suffix('}')?.chars().peekable();
    let string = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| -> Option<String> {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let quote = chars.next().filter(|c| *c == '\'' || *c == '"')?;
        let mut s = String::new();
        loop {
            match chars.next()? {
                '\\' => s.push(chars.next()?),
                c if c == quote => return Some(s),
                c => s.push(c),
            }
        }
    };
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let k = string(&mut chars)?;
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next()? != ':' {
            return None;
        }
        let v = string(&mut chars)?;
        out.insert(k, v);
    }
}

fn stored(a: WindowAggregate) -> Option<StoredWindow> {
    let meter = a.meter?;
    Some(StoredWindow {
        subject: a.tenant_id,
        start: a.window_start,
        end: a.window_end,
        group_by: meter.group_by,
        value: meter.value,
        total: a.total_amount,
        count: a.pulse_count,
        min: a.min_amount,
        max: a.max_amount,
        latest: a.latest.map(|l| (l.event_time, l.id, l.value)),
    })
}

/// A decimal as a JSON number, digit for digit (a `serde_json::Value` would hold it
/// as an f64: `0.20` would be written `0.2`, `6.51E-7` as `6.51e-7`, large sums rounded).
fn number(d: rust_decimal::Decimal) -> Option<Box<RawValue>> {
    RawValue::from_string(d.to_string()).ok()
}

/// OpenMeter's `MeterQueryResult`.
#[derive(serde::Serialize)]
struct QueryAnswer {
    from: Option<String>,
    to: Option<String>,
    #[serde(rename = "windowSize")]
    window_size: Option<&'static str>,
    data: Vec<QueryRow>,
}

/// OpenMeter's `MeterQueryRow`.
#[derive(serde::Serialize)]
struct QueryRow {
    value: Option<Box<RawValue>>,
    #[serde(rename = "windowStart")]
    window_start: String,
    #[serde(rename = "windowEnd")]
    window_end: String,
    subject: Option<String>,
    #[serde(rename = "groupBy")]
    group_by: BTreeMap<String, Option<String>>,
}

/// `GET /api/v1/meters/{idOrSlug}/query`.
pub async fn query_meter(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(slug): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<axum::response::Response, ApiError> {
    let caller = app.authenticate(&headers)?;
    let meter = meter_of(&app, &slug)?.clone();
    let mut q = parse_query(raw.as_deref().unwrap_or(""), &meter)?;
    if let super::keys::Caller::Tenant { tenant_id, .. } = &caller {
        if let Some(other) = q.subjects.iter().find(|s| *s != tenant_id) {
            return Err(ApiError::forbidden_tenant(other));
        }
        if q.subjects.is_empty() {
            q.subjects.push(tenant_id.clone());
        }
    }
    let sizes: Vec<StoredSize> = app.cfg.windows.iter().map(|w| StoredSize { name: w.name.clone(), size_ms: w.size_ms() }).collect();
    let inexact = |e: query::Inexact| ApiError::bad_request("inexact_query", e.0);
    let mut usable = query::candidates(&q, &sizes).map_err(inexact)?;
    loop {
        let (view, slug, sizes, query) = (Arc::clone(&app.view), meter.slug.clone(), usable.clone(), q.clone());
        let gathered = super::usage::read_view(move || gather(&view, &slug, &sizes, &query)).await?;
        let from = q.from.or_else(|| gathered.iter().map(|(_, w)| w.start).min());
        let to = q.to.or_else(|| gathered.iter().map(|(_, w)| w.end).max());
        let (Some(from), Some(to)) = (from, to) else {
            return Ok(answer(&q, Vec::new()));
        };
        // Every size that answered must have the asked windows' boundaries; a size that
        // does not is left out and the windows gathered again without it.
        let used: BTreeSet<usize> = gathered.iter().map(|(size, _)| *size).collect();
        let refused: Vec<(usize, query::Inexact)> =
            used.iter().filter_map(|&i| query::check(&q, &usable[i], from, to).err().map(|e| (i, e))).collect();
        if let Some((_, why)) = refused.first() {
            let why = why.clone();
            let out: BTreeSet<usize> = refused.iter().map(|(i, _)| *i).collect();
            usable = usable.into_iter().enumerate().filter(|(i, _)| !out.contains(i)).map(|(_, s)| s).collect();
            if usable.is_empty() {
                return Err(inexact(why));
            }
            continue;
        }
        let windows: Vec<StoredWindow> = gathered.into_iter().map(|(_, w)| w).collect();
        let rows = query::fold(&q, meter.aggregation, &windows, from, to).map_err(inexact)?;
        return Ok(answer(&q, rows));
    }
}

/// The stored windows that answer `q`, each with the index of its size in `sizes`
/// (coarsest first). Windows are emitted when they close, so a coarse size lags the
/// finer ones: per subject, the coarsest size's windows are taken, then each finer
/// size fills in after the last window of the coarser ones (every window of a
/// subject's partition closed before the last one that did, so the gap is only at the
/// end). Coarse windows keep the scan short; the fill keeps the answer whole.
fn gather(view: &super::view::UsageView, slug: &str, sizes: &[StoredSize], q: &Query) -> Result<Vec<(usize, StoredWindow)>, super::view::ViewError> {
    let Some(finest) = sizes.last() else { return Ok(Vec::new()) };
    let subjects = if q.subjects.is_empty() { view.meter_subjects(slug, &finest.name)? } else { q.subjects.clone() };
    let (from, to) = (q.from.unwrap_or(i64::MIN), q.to.unwrap_or(i64::MAX));
    let mut out = Vec::new();
    for subject in &subjects {
        let mut cursor = from;
        let mut coarser: Option<i64> = None;
        for (i, size) in sizes.iter().enumerate() {
            // A finer size fills in only if its windows tile the coarser ones'.
            if coarser.is_some_and(|c| c % size.size_ms != 0) {
                break;
            }
            coarser = Some(size.size_ms);
            let windows: Vec<StoredWindow> =
                view.meter_windows(slug, &size.name, subject, cursor, to)?.into_iter().filter_map(stored).collect();
            if let Some(end) = windows.iter().map(|w| w.end).max() {
                cursor = cursor.max(end);
            }
            out.extend(windows.into_iter().map(|w| (i, w)));
        }
    }
    Ok(out)
}

fn answer(q: &Query, rows: Vec<query::Row>) -> axum::response::Response {
    let data = rows
        .into_iter()
        .map(|r| QueryRow {
            value: number(r.value),
            window_start: query::rfc3339(r.window_start),
            window_end: query::rfc3339(r.window_end),
            subject: r.subject,
            group_by: r.group_by,
        })
        .collect();
    let body = QueryAnswer {
        from: q.from.map(query::rfc3339),
        to: q.to.map(query::rfc3339),
        window_size: q.window_size.map(WindowSize::as_str),
        data,
    };
    axum::response::IntoResponse::into_response(Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::keys::Caller;

    fn meters() -> Meters {
        #[derive(serde::Deserialize)]
        struct F {
            meters: Meters,
        }
        toml::from_str::<F>("[[meters]]\nslug = \"tokens\"\nevent_type = \"prompt\"\naggregation = \"sum\"\nvalue_property = \"$.tokens\"\ngroup_by = { model = \"$.model\" }\n").unwrap().meters
    }

    fn ev(id: &str, subject: &str, data: &str) -> String {
        format!(r#"{{"specversion":"1.0","id":"{id}","source":"t","type":"prompt","subject":"{subject}","data":{data}}}"#)
    }

    #[test]
    fn events_are_all_or_nothing_and_scoped_to_the_key() {
        let acme = Caller::Tenant { key_id: "k".into(), tenant_id: "acme".into() };
        let batch = format!("[{},{}]", ev("1", "acme", r#"{"tokens":1}"#), ev("2", "acme", r#"{"tokens":"x"}"#));
        let err = prepare_events(batch.as_bytes(), "application/cloudevents-batch+json", &acme, &meters()).unwrap_err();
        assert_eq!((err.status, err.code, err.errors.len(), err.errors[0].index), (StatusCode::BAD_REQUEST, "invalid_event", 1, 1));
        assert!(err.errors[0].detail.starts_with("meter tokens:"), "{}", err.errors[0].detail);
        let one = ev("1", "globex", r#"{"tokens":1}"#);
        assert_eq!(prepare_events(one.as_bytes(), "application/cloudevents+json", &acme, &meters()).unwrap_err().code, "forbidden_tenant");
        let ok = prepare_events(ev("9", "acme", r#"{"tokens":2}"#).as_bytes(), "application/json", &acme, &meters()).unwrap();
        assert_eq!((ok.len(), ok[0].pulse_id.as_str()), (1, "9"));
        assert_eq!(prepare_events(b"{}", "text/plain", &acme, &meters()).unwrap_err().status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(prepare_events(br#"{"id":"1"}"#, "application/cloudevents+json", &acme, &meters()).unwrap_err().errors[0].reason, "missing_field");
    }

    #[test]
    fn filters_come_in_every_spelling_clients_send() {
        let m = meters().get("tokens").unwrap().clone();
        let deep = parse_query("filterGroupBy%5Bmodel%5D=gpt-4&subject=a&subject=b&groupBy=model&windowSize=DAY&windowTimeZone=Asia%2FKolkata", &m).unwrap();
        assert_eq!(deep.filter_group_by, [("model".to_owned(), "gpt-4".to_owned())].into());
        assert_eq!((deep.subjects.len(), deep.window_size), (2, Some(WindowSize::Day)));
        let python = parse_query("filterGroupBy=%7B%27model%27%3A%20%27gpt-4%27%7D", &m).unwrap();
        assert_eq!(python.filter_group_by, deep.filter_group_by);
        let json = parse_query("filterGroupBy=%7B%22model%22%3A%22gpt-4%22%7D", &m).unwrap();
        assert_eq!(json.filter_group_by, deep.filter_group_by);
        for bad in ["groupBy=region", "filterGroupBy%5Bregion%5D=x", "windowSize=WEEK", "windowTimeZone=Mars%2FOlympus", "from=yesterday", "colour=red"] {
            assert_eq!(parse_query(bad, &m).unwrap_err().status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
