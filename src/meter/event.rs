//! CloudEvents 1.0 in structured JSON mode (SPEC §10): decoded borrowing from the
//! record bytes, checked, and told apart from pulses by `specversion`.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::pulse::validate::{identifier, RejectReason, Rejection};
use crate::pulse::time;

/// A CloudEvent as written, before it is checked.
#[derive(Debug, Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow, default)]
    specversion: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    datacontenttype: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// A checked CloudEvent: the attributes pulses uses, and `data` as JSON text.
#[derive(Debug, Clone)]
pub struct CloudEvent<'a> {
    pub id: Cow<'a, str>,
    pub source: Cow<'a, str>,
    pub kind: Cow<'a, str>,
    /// The tenant: a tenant id by SPEC §3's rules.
    pub subject: String,
    /// `time`, if the event has one (else the record's time is used, as for pulses).
    pub time_ms: Option<i64>,
    /// `data`, when it is a JSON object (meters read properties of it).
    pub data: Option<&'a RawValue>,
}

/// Longest accepted `id` and `source`.
pub const MAX_ATTRIBUTE_LEN: usize = 256;

/// Whether a JSON value is meant as a CloudEvent: it has a `specversion` at its top
/// level. Checked only for records that are not valid pulses, so pulses pay nothing.
pub fn is_cloud_event(json: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, default)]
        specversion: Option<&'a RawValue>,
    }
    serde_json::from_slice::<Probe<'_>>(json).is_ok_and(|p| p.specversion.is_some())
}

impl<'a> CloudEvent<'a> {
    /// Decodes and checks one structured-mode event.
    pub fn decode(json: &'a [u8]) -> Result<Self, Rejection> {
        let first = json.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(Rejection::new(RejectReason::InvalidJson, "expected a JSON object (a CloudEvent)"));
        }
        let raw: RawEvent<'a> = serde_json::from_slice(json).map_err(|e| {
            let reason = match e.classify() {
                serde_json::error::Category::Data => RejectReason::InvalidField,
                _ => RejectReason::InvalidJson,
            };
            Rejection::new(reason, e.to_string())
        })?;
        Self::check(raw)
    }

    fn check(raw: RawEvent<'a>) -> Result<Self, Rejection> {
        let required = |name: &str, v: Option<Cow<'a, str>>| -> Result<Cow<'a, str>, Rejection> {
            let v = v.ok_or_else(|| Rejection::new(RejectReason::MissingField, format!("CloudEvent attribute {name} is required")))?;
            if v.is_empty() {
                return Err(Rejection::new(RejectReason::InvalidField, format!("CloudEvent attribute {name} is empty")));
            }
            if v.chars().count() > MAX_ATTRIBUTE_LEN {
                return Err(Rejection::new(RejectReason::FieldTooLong, format!("CloudEvent attribute {name} is longer than {MAX_ATTRIBUTE_LEN} characters")));
            }
            Ok(v)
        };
        let version = required("specversion", raw.specversion)?;
        if version != "1.0" {
            return Err(Rejection::new(RejectReason::InvalidField, format!("specversion {version:?} is not supported (1.0 is)")));
        }
        let id = required("id", raw.id)?;
        let source = required("source", raw.source)?;
        let kind = required("type", raw.kind)?;
        let subject = identifier("subject", raw.subject.as_deref())?;
        let time_ms = match raw.time.as_deref() {
            None => None,
            Some(t) => Some(time::parse_rfc3339_ms(t).filter(|ms| (0..=time::MAX_RFC3339_MS).contains(ms)).ok_or_else(|| {
                Rejection::new(RejectReason::BadTimestamp, format!("time {t:?} is not an RFC 3339 timestamp"))
            })?),
        };
        if let Some(ct) = raw.datacontenttype.as_deref() {
            let json = ct.split(';').next().is_some_and(|m| {
                let m = m.trim();
                m.eq_ignore_ascii_case("application/json") || m.to_ascii_lowercase().ends_with("+json")
            });
            if !json {
                return Err(Rejection::new(RejectReason::InvalidField, format!("datacontenttype {ct:?}: only JSON data is metered")));
            }
        }
        let data = match raw.data {
            None => None,
            Some(d) if d.get() == "null" => None,
            Some(d) if d.get().starts_with('{') => Some(d),
            Some(d) => {
                let shown: String = d.get().chars().take(40).collect();
                return Err(Rejection::new(RejectReason::InvalidField, format!("data must be a JSON object, not {shown}")));
            }
        };
        Ok(Self { id, source, kind, subject, time_ms, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"specversion":"1.0","id":"e-1","source":"api","type":"prompt","subject":"acme",
        "time":"2026-12-07T10:00:00.250+01:00","data":{"tokens":12}}"#;

    #[test]
    fn a_structured_event_decodes() {
        assert!(is_cloud_event(EVENT.as_bytes()));
        assert!(!is_cloud_event(br#"{"tenant_id":"acme"}"#));
        let e = CloudEvent::decode(EVENT.as_bytes()).unwrap();
        assert_eq!((&*e.id, &*e.source, &*e.kind, e.subject.as_str()), ("e-1", "api", "prompt", "acme"));
        assert_eq!(e.time_ms, Some(1_796_634_000_250));
        assert_eq!(e.data.unwrap().get(), r#"{"tokens":12}"#);
    }

    #[test]
    fn bad_events_say_why() {
        let reason = |s: &str| CloudEvent::decode(s.as_bytes()).unwrap_err();
        let base = |field: &str, value: &str| {
            let mut v: serde_json::Value = serde_json::from_str(EVENT).unwrap();
            if value == "DROP" {
                v.as_object_mut().unwrap().remove(field);
            } else {
                v[field] = serde_json::from_str(value).unwrap();
            }
            v.to_string()
        };
        for field in ["specversion", "id", "source", "type", "subject"] {
            let r = reason(&base(field, "DROP"));
            assert_eq!(r.reason, RejectReason::MissingField, "{field}");
            assert!(r.detail.contains(field), "{}", r.detail);
        }
        assert_eq!(reason(&base("specversion", "\"0.3\"")).reason, RejectReason::InvalidField);
        assert_eq!(reason(&base("time", "\"yesterday\"")).reason, RejectReason::BadTimestamp);
        assert_eq!(reason(&base("subject", "\"a b\"")).reason, RejectReason::InvalidField);
        assert_eq!(reason(&base("id", "7")).reason, RejectReason::InvalidField);
        assert_eq!(reason(&base("data", "[1]")).reason, RejectReason::InvalidField);
        assert_eq!(reason(&base("datacontenttype", "\"text/plain\"")).reason, RejectReason::InvalidField);
        assert_eq!(reason("[]").reason, RejectReason::InvalidJson);
        assert_eq!(reason("{\"specversion\":").reason, RejectReason::InvalidJson);
        assert!(CloudEvent::decode(base("data", "null").as_bytes()).unwrap().data.is_none());
    }
}
