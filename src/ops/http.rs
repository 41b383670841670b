//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`. A minimal HTTP/1.1 GET server
//! on the CLI's tokio runtime (one request per connection): scrapers and probes need
//! nothing more, and it keeps a web framework out of the build.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::metrics::Metrics;
use super::prometheus;
use crate::config::Config;

/// Prometheus scrape path.
pub const METRICS_PATH: &str = "/metrics";
/// Liveness probe: 200 while the process runs.
pub const HEALTH_PATH: &str = "/healthz";
/// Readiness probe: 200 once stages joined and stores restored, else 503.
pub const READY_PATH: &str = "/readyz";
/// Every path served (the deploy test checks probes and scrape configs against it).
pub const PATHS: [&str; 3] = [METRICS_PATH, HEALTH_PATH, READY_PATH];

/// Longest a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (http_addr / --http-addr / PULSES_HTTP_ADDR): {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// Binds `addr` (`host:port`; port 0 picks a free one).
pub async fn bind(addr: &str) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr: addr.to_owned(), source })
}

/// Serves requests until the runtime shuts down.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, cfg: Arc<Config>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (metrics, cfg) = (Arc::clone(&metrics), Arc::clone(&cfg));
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &metrics, &cfg).await {
                        tracing::debug!(%peer, "http connection: {e}");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The address the listener is bound to, for the startup log line.
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

async fn handle(mut stream: TcpStream, metrics: &Metrics, cfg: &Config) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = respond(&head, metrics, cfg);
    stream.write_all(&response).await?;
    stream.shutdown().await
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// The whole response to a request head: pure, so it is unit-tested without sockets.
pub fn respond(head: &[u8], metrics: &Metrics, cfg: &Config) -> Vec<u8> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", METRICS_PATH) => ("200 OK", prometheus::CONTENT_TYPE, prometheus::render(metrics, cfg)),
        ("GET" | "HEAD", HEALTH_PATH) => ("200 OK", TEXT, "ok\n".to_owned()),
        ("GET" | "HEAD", READY_PATH) => match metrics.ops.readiness.status() {
            Ok(()) => ("200 OK", TEXT, "ready\n".to_owned()),
            Err(why) => ("503 Service Unavailable", TEXT, format!("not ready: {why}\n")),
        },
        ("GET" | "HEAD", _) => ("404 Not Found", TEXT, format!("not found; try {}\n", PATHS.join(" "))),
        _ => ("405 Method Not Allowed", TEXT, "only GET and HEAD\n".to_owned()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

const TEXT: &str = "text/plain; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, m: &Metrics) -> String {
        String::from_utf8(respond(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(), m, &Config::default())).unwrap()
    }

    #[test]
    fn routes() {
        let m = Metrics::default();
        assert!(get("/healthz", &m).starts_with("HTTP/1.1 200 OK\r\n"));
        let r = get("/readyz", &m);
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.ends_with("not ready: starting\n"));
        m.ops.readiness.expect_stages(["group"]);
        m.ops.readiness.joined("group");
        assert!(get("/readyz?verbose", &m).starts_with("HTTP/1.1 200 OK\r\n"));
        let metrics = get("/metrics", &m);
        assert!(metrics.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(metrics.contains("\r\n\r\n# HELP pulses_records_consumed_total "));
        assert!(get("/nope", &m).starts_with("HTTP/1.1 404 "));
        let post = String::from_utf8(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &m, &Config::default())).unwrap();
        assert!(post.starts_with("HTTP/1.1 405 "));
    }
}
