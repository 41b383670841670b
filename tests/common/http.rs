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
    let handle = std::sync::Arc::new(handle);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let handle = std::sync::Arc::clone(&handle);
            std::thread::spawn(move || {
                let Ok(mut writer) = stream.try_clone() else { return };
                let mut reader = BufReader::new(stream);
                while let Some(request) = read_request(&mut reader) {
                    let r = handle(request);
                    let reason = match r.status {
                        200 => "OK",
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
                    if writer.write_all(head.as_bytes()).and_then(|_| writer.write_all(r.body.as_bytes())).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// The next request of a connection, or None when it closes or is malformed.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut length = 0usize;
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
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request { method, path, body })
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
