//! Invoices over HTTP (SPEC §9): `POST /v1/invoices` issues through the same
//! [`crate::billing::issue`] as `pulses invoice` (so two replicas, or a replica and the
//! CLI, issue an invoice once); `GET /v1/invoices`, `GET /v1/invoices/{id}` and its
//! printable page `GET /v1/invoices/{id}.html` answer from the replica's invoices view.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::{blocking, ApiError};
use super::usage::{read_view, tenant_of};
use super::{invoice_page, App};
use crate::billing::{self, Outcome, Request};
use crate::invoice::Invoice;
use crate::rate::period;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    period: String,
    tenant_id: Option<String>,
    #[serde(default)]
    adjustments: bool,
}

/// `POST /v1/invoices`: one tenant's invoice (201), or with an admin key and no
/// `tenant_id`, every tenant's (200, the run's report).
pub async fn post_invoices(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let caller = app.authenticate(&headers)?;
    let body: IssueBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("expected {{\"period\":\"YYYY-MM\",\"tenant_id\":\"…\"}}: {e}")))?;
    period::bounds(&body.period).map_err(|e| ApiError::bad_request("invalid_parameter", e))?;
    let tenant = match (&caller, body.tenant_id.as_deref()) {
        (super::keys::Caller::Admin { .. }, None) => None,
        (caller, asked) => Some(tenant_of(caller, asked)?),
    };
    let request = Request { period: body.period, tenant: tenant.clone(), adjustments: body.adjustments };
    let cfg = Arc::clone(&app.cfg);
    let report = blocking(move || billing::issue(&cfg, &request)).await?;
    if tenant.is_none() {
        return Ok(Json(report).into_response());
    }
    let Some(one) = report.outcomes.into_iter().next() else {
        return Err(ApiError::internal("the run reported no outcome for the tenant"));
    };
    match one.outcome {
        Outcome::Issued(doc) => Ok((StatusCode::CREATED, Json(doc)).into_response()),
        Outcome::AlreadyIssued { invoice_id, number, adjustment_pending } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invoice_already_exists",
            format!("{} already has invoice {number} ({invoice_id}) for this period", one.tenant_id),
        )
        .with("invoice_id", invoice_id)
        .with("number", number)
        .with("adjustment_pending", adjustment_pending.map(|d| d.to_string()))),
        Outcome::PeriodOpen { reason } => Err(ApiError::new(StatusCode::CONFLICT, "period_open", reason)),
        Outcome::NothingToBill => Err(ApiError::new(StatusCode::NOT_FOUND, "no_charges", format!("{} has no charges in this period", one.tenant_id))),
        Outcome::Failed { reason } => Err(ApiError::internal(format!("the invoice cannot be built: {reason}"))),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    tenant_id: Option<String>,
    period: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct InvoiceList {
    pub tenant_id: String,
    /// Invoices and their credit and debit notes, by period then number.
    pub invoices: Vec<Invoice>,
}

/// `GET /v1/invoices?tenant_id=T[&period=YYYY-MM]`.
pub async fn list_invoices(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Result<Json<InvoiceList>, ApiError> {
    let caller = app.authenticate(&headers)?;
    let tenant = tenant_of(&caller, q.tenant_id.as_deref())?;
    let (from, to) = match q.period.as_deref() {
        Some(p) => period::bounds(p).map_err(|e| ApiError::bad_request("invalid_parameter", e))?,
        None => (i64::MIN, i64::MAX),
    };
    let view = Arc::clone(&app.invoices);
    let t = tenant.clone();
    let mut invoices = read_view(move || view.invoices(&t, from, to)).await?;
    invoices.sort_by_key(|a| (a.period_start, a.adjustment, a.number));
    Ok(Json(InvoiceList { tenant_id: tenant, invoices }))
}

/// `GET /v1/invoices/{id}` (JSON) and `GET /v1/invoices/{id}.html` (the printable page).
pub async fn get_invoice(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let caller = app.authenticate(&headers)?;
    let (id, html) = match id.strip_suffix(".html") {
        Some(id) => (id.to_owned(), true),
        None => (id, false),
    };
    let view = Arc::clone(&app.invoices);
    let lookup = id.clone();
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no invoice {id:?}"));
    let doc = read_view(move || view.get(&lookup)).await?.ok_or_else(not_found)?;
    // Another tenant's invoice is answered as missing: its id says nothing.
    if !caller.may_act_for(&doc.tenant_id) {
        return Err(not_found());
    }
    if html {
        let page = invoice_page::render(&doc);
        return Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response());
    }
    Ok(Json(doc).into_response())
}
