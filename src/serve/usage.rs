//! `GET /v1/usage`, `POST /v1/quota/check` and `GET /v1/me` (SPEC §8): answered from
//! the replica's usage view ([`super::view`]), scoped by the API key.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::ApiError;
use super::keys::Caller;
use super::quota;
use super::view;
use super::App;
use crate::pulse::time;
use crate::window::WindowAggregate;

#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    tenant_id: Option<String>,
    window: Option<String>,
    product_sku: Option<String>,
    use_unit: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AsOf {
    pub lag: i64,
    pub updated_at: String,
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub tenant_id: String,
    pub window: String,
    pub as_of: AsOf,
    pub windows: Vec<WindowAggregate>,
    pub totals: Vec<Total>,
}

/// The exact sum of one sku and unit over the windows of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Total {
    pub product_sku: String,
    pub use_unit: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub total_amount: Decimal,
    pub pulse_count: u64,
}

/// Totals by sku and unit, in that order; None if a sum does not fit an exact decimal.
pub fn totals(windows: &[WindowAggregate]) -> Option<Vec<Total>> {
    let mut by: BTreeMap<(&str, &str), (Decimal, u64)> = BTreeMap::new();
    for w in windows {
        let t = by.entry((&w.product_sku, &w.use_unit)).or_insert((Decimal::ZERO, 0));
        t.0 = t.0.checked_add(w.total_amount)?;
        t.1 += w.pulse_count;
    }
    Some(
        by.into_iter()
            .map(|((sku, unit), (total_amount, pulse_count))| Total { product_sku: sku.into(), use_unit: unit.into(), total_amount, pulse_count })
            .collect(),
    )
}

/// The tenant a request asks about: its key's (a tenant key asking for another gets
/// 403); an admin key must name one.
pub(super) fn tenant_of(caller: &Caller, asked: Option<&str>) -> Result<String, ApiError> {
    match (caller, asked) {
        (Caller::Tenant { tenant_id, .. }, None) => Ok(tenant_id.clone()),
        (caller, Some(t)) if caller.may_act_for(t) => Ok(t.to_owned()),
        (_, Some(t)) => Err(ApiError::forbidden_tenant(t)),
        (Caller::Admin { .. }, None) => Err(ApiError::bad_request("missing_parameter", "an admin key must name tenant_id")),
    }
}

pub(super) fn timestamp(name: &str, value: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => chrono::DateTime::parse_from_rfc3339(v)
            .map(|t| t.timestamp_millis())
            .map_err(|e| ApiError::bad_request("invalid_parameter", format!("{name}={v:?} is not an RFC 3339 time: {e}"))),
    }
}

impl From<view::AsOf> for AsOf {
    fn from(a: view::AsOf) -> Self {
        AsOf { lag: a.lag, updated_at: time::format_ms(a.updated_at_ms) }
    }
}

/// Runs `read` of a view off the async workers (RocksDB reads block).
pub(super) async fn read_view<R: Send + 'static>(read: impl FnOnce() -> Result<R, view::ViewError> + Send + 'static) -> Result<R, ApiError> {
    super::error::blocking(read).await
}

impl App {
    fn as_of(&self) -> AsOf {
        self.view.as_of().into()
    }

    /// `tenant`'s aggregates of `window` starting in `[from, to)`, read from the view.
    async fn windows(&self, tenant: String, window: String, from: i64, to: i64) -> Result<Vec<WindowAggregate>, ApiError> {
        let view = Arc::clone(&self.view);
        read_view(move || view.windows(&tenant, &window, from, to)).await
    }
}

/// `GET /v1/usage`.
pub async fn get_usage(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<UsageQuery>) -> Result<Json<Usage>, ApiError> {
    let caller = app.authenticate(&headers)?;
    let tenant = tenant_of(&caller, q.tenant_id.as_deref())?;
    let window = q.window.filter(|w| !w.is_empty()).ok_or_else(|| ApiError::bad_request("missing_parameter", "window is required"))?;
    let from = timestamp("from", q.from.as_deref(), i64::MIN)?;
    let to = timestamp("to", q.to.as_deref(), i64::MAX)?;
    let mut windows = app.windows(tenant.clone(), window.clone(), from, to).await?;
    windows.retain(|a| q.product_sku.as_ref().is_none_or(|s| *s == a.product_sku) && q.use_unit.as_ref().is_none_or(|u| *u == a.use_unit));
    let totals = totals(&windows).ok_or_else(|| ApiError::internal("a total does not fit an exact decimal"))?;
    Ok(Json(Usage { tenant_id: tenant, window, as_of: app.as_of(), windows, totals }))
}

#[derive(Debug, Deserialize)]
pub struct CheckRequest {
    tenant_id: Option<String>,
    product_sku: String,
    use_unit: String,
    requested: Box<RawValue>,
}

/// `POST /v1/quota/check`.
pub async fn post_quota_check(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<CheckRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<quota::Check>, ApiError> {
    let caller = app.authenticate(&headers)?;
    let Json(req) = body.map_err(|e| ApiError::bad_request("invalid_json", e.body_text()))?;
    let tenant = tenant_of(&caller, req.tenant_id.as_deref())?;
    let requested = quota::requested(&req.requested).map_err(|e| ApiError::bad_request("invalid_requested", e))?;
    let quotas = app.quotas.current();
    let as_of = app.as_of().updated_at;
    let Some(q) = quotas.find(&tenant, &req.product_sku, &req.use_unit).cloned() else {
        return Ok(Json(quota::check(None, Decimal::ZERO, requested, None, as_of)));
    };
    let (start, end) = q.period.bounds(time::now_ms());
    let windows = app.windows(tenant, app.finest_window.clone(), start, end).await?;
    let mut used = Decimal::ZERO;
    for w in windows.iter().filter(|w| w.product_sku == req.product_sku && w.use_unit == req.use_unit) {
        used = used.checked_add(w.total_amount).ok_or_else(|| ApiError::internal("usage does not fit an exact decimal"))?;
    }
    Ok(Json(quota::check(Some(&q), used, requested, Some(time::format_ms(start)), as_of)))
}

#[derive(Debug, Serialize)]
pub struct Me {
    key_id: String,
    tenant_id: Option<String>,
    admin: bool,
    /// The configured windows (name, size in ms), finest first: what `window=` takes.
    windows: Vec<(String, i64)>,
}

/// `GET /v1/me`: who the key acts for, and the windows to ask about (the dashboard).
pub async fn get_me(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<Me>, ApiError> {
    let (key_id, tenant_id, admin) = match app.authenticate(&headers)? {
        Caller::Admin { key_id } => (key_id, None, true),
        Caller::Tenant { key_id, tenant_id } => (key_id, Some(tenant_id), false),
    };
    let mut windows: Vec<(String, i64)> = app.cfg.windows.iter().map(|w| (w.name.clone(), w.size_ms())).collect();
    windows.sort_by_key(|w| w.1);
    Ok(Json(Me { key_id, tenant_id, admin, windows }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(sku: &str, unit: &str, total: &str, count: u64) -> WindowAggregate {
        let total: Decimal = total.parse().unwrap();
        let acc = crate::window::Accumulator { total, count, min: total, max: total, first_event_time: 0, last_event_time: 0, latest: None };
        let key = crate::window::GroupKey::new("acme", sku, unit);
        WindowAggregate::new(&key, "minute", 0, 60_000, &acc, 0, true, 0)
    }

    #[test]
    fn totals_are_exact_sums_by_sku_and_unit() {
        let w = [agg("vm", "h", "0.1", 1), agg("vm", "h", "0.2", 2), agg("disk", "GB", "79228162514264337593543950335", 1)];
        let t = totals(&w).unwrap();
        assert_eq!(t[0], Total { product_sku: "disk".into(), use_unit: "GB".into(), total_amount: "79228162514264337593543950335".parse().unwrap(), pulse_count: 1 });
        assert_eq!((t[1].total_amount.to_string(), t[1].pulse_count), ("0.3".into(), 3));
        assert!(totals(&[agg("d", "u", "79228162514264337593543950335", 1), agg("d", "u", "1", 1)]).is_none(), "overflow is refused, not rounded");
    }

    #[test]
    fn a_tenant_key_reads_its_own_tenant_and_an_admin_names_one() {
        let acme = Caller::Tenant { key_id: "k".into(), tenant_id: "acme".into() };
        assert_eq!(tenant_of(&acme, None).unwrap(), "acme");
        assert_eq!(tenant_of(&acme, Some("globex")).unwrap_err().code, "forbidden_tenant");
        let admin = Caller::Admin { key_id: "a".into() };
        assert_eq!(tenant_of(&admin, Some("globex")).unwrap(), "globex");
        assert_eq!(tenant_of(&admin, None).unwrap_err().code, "missing_parameter");
    }
}
