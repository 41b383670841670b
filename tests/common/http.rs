//! Plain HTTP/1.1 for tests: a GET client and a Prometheus text parser (the test talks
//! to the endpoint like a scraper or a kubelet would), and a tiny server for the
//! stand-ins of services pulses calls (OTLP collector, Schema Registry).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

/// One request a stand-in server received.
pub struct Request {
    pub method: String,
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

/// A stand-in's answer: status, content type, body.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// Serves HTTP/1.1 on 127.0.0.1 (any free port) with `handle`, one thread per
/// (keep-alive) connection, until the test process ends; returns the base URL.
pub fn serve(handle: impl Fn(Request) -> Response + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test server");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    accept_each(listener, move |stream| serve_connection(stream, &handle));
    url
}

/// Hands each connection `listener` accepts to `connection` on a thread of its own,
/// until the test process ends.
fn accept_each(listener: TcpListener, connection: impl Fn(TcpStream) + Send + Sync + 'static) {
    let connection = std::sync::Arc::new(connection);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let connection = std::sync::Arc::clone(&connection);
            std::thread::spawn(move || connection(stream));
        }
    });
}

/// [`serve`] over TLS with the certificate `cert` and its key `key` (PEM files):
/// returns an `https://` base URL.
pub fn serve_https(cert: &std::path::Path, key: &std::path::Path, handle: impl Fn(Request) -> Response + Send + Sync + 'static) -> String {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).expect("TLS acceptor");
    acceptor.set_private_key_file(key, SslFiletype::PEM).expect("server key");
    acceptor.set_certificate_chain_file(cert).expect("server certificate");
    let acceptor = acceptor.build();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test server");
    let url = format!("https://{}", listener.local_addr().expect("addr"));
    accept_each(listener, move |stream| {
        // A client that refuses our certificate ends here.
        if let Ok(tls) = acceptor.accept(stream) {
            serve_connection(tls, &handle);
        }
    });
    url
}

fn serve_connection<S: Read + Write>(stream: S, handle: &dyn Fn(Request) -> Response) {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        let r = handle(request);
        let reason = match r.status {
            200 => "OK",
            401 => "Unauthorized",
            404 => "Not Found",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
            r.status,
            r.content_type,
            r.body.len()
        );
        let writer = reader.get_mut();
        if writer.write_all(head.as_bytes()).and_then(|_| writer.write_all(r.body.as_bytes())).and_then(|_| writer.flush()).is_err() {
            return;
        }
    }
}

/// The next request of a connection, or None when it closes or is malformed.
fn read_request<S: Read>(reader: &mut BufReader<S>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut length = 0usize;
    let mut authorization = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            } else if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_owned());
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request { method, path, authorization, body })
}

/// GET `path` from `addr`: (status code, body), or None if nothing answers yet.
pub use pulses::bench::processor::http_get as get;

/// Samples of a Prometheus text exposition: `name{labels}` (as written) → value.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Scrapes `/metrics` and parses it.
pub fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (status, body) = get(addr, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}
