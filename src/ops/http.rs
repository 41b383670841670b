//! The HTTP plumbing every pulses process shares, on axum: the operational routes
//! (`/metrics`, `/healthz`, `/readyz`), binding the listener, and serving until a
//! shutdown. `pulses run` serves only these; `pulses serve` adds its API to them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::prometheus;

/// Prometheus scrape path.
pub const METRICS_PATH: &str = "/metrics";
/// Liveness probe: 200 while the process runs.
pub const HEALTH_PATH: &str = "/healthz";
/// Readiness probe: 200 once the process can do its work, else 503 with the reason.
pub const READY_PATH: &str = "/readyz";
/// Every operational path (the deploy test checks probes and scrape configs against it).
pub const PATHS: [&str; 3] = [METRICS_PATH, HEALTH_PATH, READY_PATH];

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (http_addr / --http-addr / PULSES_HTTP_ADDR): {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// Whether the process is ready, and if not, why.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the operational routes read.
#[derive(Clone)]
pub struct Ops {
    pub registry: Arc<Registry>,
    pub ready: ReadyCheck,
}

/// `/metrics`, `/healthz` and `/readyz` (GET and HEAD; other methods get 405).
pub fn ops_routes(ops: Ops) -> Router {
    Router::new()
        .route(METRICS_PATH, get(metrics))
        .route(HEALTH_PATH, get(|| async { text(StatusCode::OK, "ok\n".into()) }))
        .route(READY_PATH, get(ready))
        .with_state(ops)
}

/// [`ops_routes`] with a plain-text 404 naming them, for `pulses run`.
pub fn ops_only(ops: Ops) -> Router {
    ops_routes(ops).fallback(|| async { text(StatusCode::NOT_FOUND, format!("not found; try {}\n", PATHS.join(" "))) })
}

async fn metrics(State(ops): State<Ops>) -> Response {
    ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], prometheus::render(&ops.registry)).into_response()
}

async fn ready(State(ops): State<Ops>) -> Response {
    match (ops.ready)() {
        Ok(()) => text(StatusCode::OK, "ready\n".into()),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// Binds `addr` (`host:port`; port 0 picks a free one).
pub async fn bind(addr: &str) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr: addr.to_owned(), source })
}

/// The address the listener is bound to, for the startup log line.
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

/// Serves `app` until `shutdown` completes; then stops accepting and waits for the
/// requests in flight to finish.
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::ops::metrics::Metrics;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn call(app: &Router, method: &str, path: &str) -> (u16, String, String) {
        let req = Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let ctype = res.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap();
        (status, ctype, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn routes() {
        let m = Arc::new(Metrics::default());
        let registry = Arc::new(prometheus::pipeline_registry(Arc::clone(&m), &Config::default()));
        let readiness = Arc::clone(&m);
        let app = ops_only(Ops { registry, ready: Arc::new(move || readiness.ops.readiness.status()) });
        assert_eq!(call(&app, "GET", "/healthz").await.0, 200);
        assert_eq!(call(&app, "GET", "/readyz").await, (503, "text/plain; charset=utf-8".into(), "not ready: starting\n".into()));
        m.ops.readiness.expect_stages(["group"]);
        m.ops.readiness.joined("group");
        assert_eq!(call(&app, "GET", "/readyz?verbose").await.0, 200);
        let (status, ctype, body) = call(&app, "GET", "/metrics").await;
        assert_eq!((status, ctype.as_str()), (200, "text/plain; version=0.0.4; charset=utf-8"));
        assert!(body.starts_with("# HELP pulses_records_consumed_total "), "{body}");
        let head = call(&app, "HEAD", "/metrics").await;
        assert_eq!((head.0, head.2.as_str()), (200, ""));
        assert_eq!(call(&app, "GET", "/nope").await.0, 404);
        assert_eq!(call(&app, "POST", "/metrics").await.0, 405);
    }
}
