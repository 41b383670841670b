//! The usage dashboard (`GET /`): a page, its script and Chart.js (MIT, vendored in
//! `assets/` with its licence), all embedded in the binary so it needs no network at
//! run time. The page asks for an API key and reads the same API as everyone else.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("assets/index.html");
const APP: &str = include_str!("assets/app.js");
const CHART: &str = include_str!("assets/chart.umd.min.js");

/// `/`, `/assets/app.js`, `/assets/chart.umd.min.js`.
pub fn routes() -> Router {
    let asset = |body: &'static str, kind: &'static str| {
        get(move || async move { ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response() })
    };
    Router::new()
        .route("/", asset(INDEX, "text/html; charset=utf-8"))
        .route("/assets/app.js", asset(APP, "text/javascript; charset=utf-8"))
        .route("/assets/chart.umd.min.js", asset(CHART, "text/javascript; charset=utf-8"))
}
