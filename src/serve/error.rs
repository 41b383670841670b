//! Errors of the HTTP API, as SPEC §8 writes them: a status and
//! `{"error":"<code>","detail":"…"}`, plus per-pulse reasons for invalid pulses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// Why one pulse of a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PulseError {
    pub index: usize,
    pub reason: &'static str,
    pub detail: String,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Invalid pulses, for `invalid_pulse`.
    pub errors: Vec<PulseError>,
    /// Seconds a client should wait before retrying (503, 429).
    pub retry_after: Option<u64>,
    /// More fields of the answer (e.g. the existing `invoice_id` of a 409).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self { status, code, detail: detail.into(), errors: Vec::new(), retry_after: None, extra: Default::default() }
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn forbidden_tenant(tenant: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden_tenant", format!("this API key may not act for tenant {tenant:?}"))
    }

    pub fn invalid_pulses(errors: Vec<PulseError>) -> Self {
        let detail = format!("{} invalid pulse(s); nothing was accepted", errors.len());
        Self { errors, ..Self::bad_request("invalid_pulse", detail) }
    }

    pub fn invalid_events(errors: Vec<PulseError>) -> Self {
        let detail = format!("{} invalid event(s); nothing was accepted", errors.len());
        Self { errors, ..Self::bad_request("invalid_event", detail) }
    }

    pub fn unavailable(detail: impl Into<String>, retry_after: u64) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail) }
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }

    /// The same answer with `field` set in its body.
    pub fn with(mut self, field: &str, value: impl Serialize) -> Self {
        self.extra.insert(field.to_owned(), serde_json::to_value(value).unwrap_or_default());
        self
    }

    pub fn too_many_requests(detail: impl Into<String>) -> Self {
        Self { retry_after: Some(1), ..Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", detail) }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [PulseError],
    #[serde(flatten)]
    extra: &'a serde_json::Map<String, serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body { error: self.code, detail: &self.detail, errors: &self.errors, extra: &self.extra };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A billing failure as an answer: a bad request is a 400, a refusal decided in log
/// order a 409 with its code (and the job in the way), a missing job a 404; Kafka
/// trouble a 503 to retry.
impl From<crate::billing::BillingError> for ApiError {
    fn from(e: crate::billing::BillingError) -> Self {
        use crate::billing::BillingError;
        match e {
            BillingError::BadRequest(detail) => ApiError::bad_request("invalid_parameter", detail),
            BillingError::Conflict { code, detail, job_id } => ApiError::new(StatusCode::CONFLICT, code, detail).with("job_id", job_id),
            BillingError::NotFound(detail) => ApiError::new(StatusCode::NOT_FOUND, "not_found", detail),
            other => ApiError::unavailable(other.to_string(), 5),
        }
    }
}

impl From<super::view::ViewError> for ApiError {
    fn from(e: super::view::ViewError) -> Self {
        ApiError::internal(e.to_string())
    }
}

/// Runs blocking work (Kafka clients, RocksDB reads) off the async workers.
pub(super) async fn blocking<R, E>(work: impl FnOnce() -> Result<R, E> + Send + 'static) -> Result<R, ApiError>
where
    R: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::internal(e.to_string()))?.map_err(Into::into)
}
