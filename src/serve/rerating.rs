//! Re-rating jobs over HTTP (SPEC §9), admin keys only: `POST /v1/rerating-jobs` asks
//! the jobs' decider ([`crate::billing::rerating`]) and, once accepted, runs the job on
//! a thread of this replica; `GET /v1/rerating-jobs/{id}` reads its state from the
//! jobs' log; `POST /v1/rerating-jobs/{id}/apply` issues its diff as notes.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::{blocking, ApiError};
use super::keys::Caller;
use super::App;
use crate::billing::rerating::{self, JobRequest, RequestError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobBody {
    from: String,
    to: String,
    tenant_id: Option<String>,
    /// A price book file, or a name (`topology/<name>.toml`).
    price_book: Option<String>,
    /// The window size rated [default: minute, as `pulses rate`].
    window: Option<String>,
}

fn admin_only(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    match app.authenticate(headers)? {
        Caller::Admin { .. } => Ok(()),
        Caller::Tenant { .. } => Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "re-rating jobs need an admin key")),
    }
}

/// `POST /v1/rerating-jobs`: 202 with the queued job, which this replica runs.
pub async fn post_job(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, ApiError> {
    admin_only(&app, &headers)?;
    let body: JobBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("expected {{\"from\":…,\"to\":…,\"tenant_id\"?,\"price_book\"?,\"window\"?}}: {e}")))?;
    let req = JobRequest::parse(&app.cfg, &body.from, &body.to, body.tenant_id, body.price_book.as_deref(), body.window).map_err(|e| {
        let code = match e {
            RequestError::Invalid(_) => "invalid_parameter",
            RequestError::PriceBook(_) => "invalid_price_book",
        };
        ApiError::bad_request(code, e.to_string())
    })?;
    let cfg = Arc::clone(&app.cfg);
    let job = blocking(move || rerating::submit(&cfg, &req)).await?;
    let (cfg, queued) = (Arc::clone(&app.cfg), job.clone());
    let spawned = std::thread::Builder::new().name("rerating-job".into()).spawn(move || {
        if let Err(e) = rerating::run(&cfg, queued, &AtomicBool::new(false)) {
            tracing::error!("re-rating job: {e}");
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the re-rating job's thread: {e}; it will be failed as abandoned");
    }
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// `GET /v1/rerating-jobs/{id}`.
pub async fn get_job(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    admin_only(&app, &headers)?;
    let cfg = Arc::clone(&app.cfg);
    let lookup = id.clone();
    let job = blocking(move || rerating::get(&cfg, &lookup))
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no re-rating job {id:?}")))?;
    Ok(Json(job).into_response())
}

/// `POST /v1/rerating-jobs/{id}/apply`: the job, applied.
pub async fn apply_job(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    admin_only(&app, &headers)?;
    let cfg = Arc::clone(&app.cfg);
    let job = blocking(move || rerating::apply(&cfg, &id)).await?;
    Ok(Json(job).into_response())
}
